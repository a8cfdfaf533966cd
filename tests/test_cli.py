"""The command line end to end on the generated corpus: train -> checkpoint -> translate -> eval -> BLEU."""

from __future__ import annotations

import json

import pytest

from moeformer.cli import main
from moeformer.data.synthetic import generate_pairs

TINY = """
[model]
preset = "transformer-tiny"
vocab_size = 100
d_model = 64
share_embeddings = true
max_seq_len = 64
[model.ffn]
d_ff = 128
activation = "swiglu"
bias = false
[model.moe]
kind = "deepseek"
n_experts = 7
top_k = 3
expert_hidden = 32
n_shared = 1
balance_loss = 0.01
[data]
corpus = "synthetic"
synthetic_pairs = 3000
valid_size = 100
test_size = 100
[train]
steps = 20
eval_every = 10
log_every = 5
bleu_samples = 20
batch_tokens = 1024
lr = 3e-3
warmup_steps = 5
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.toml"
    config.write_text(TINY, encoding="utf-8")
    assert main(["train", str(config), "--out", str(root / "run"), "--quiet", "--set", "train.steps=20"]) == 0
    return root / "run"


def test_train_writes_checkpoints_metrics_and_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 20 and "test_bleu" in summary["test"]
    assert (run_dir / "latest").exists() and (run_dir / "best").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("bleu" in r for r in rows)


def test_translate_prints_one_line_per_input(run_dir, capsys):
    assert main(["translate", str(run_dir), "at 3:45 pm on May 2nd", "I have 3 books.", "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_eval_scores_a_parallel_file(run_dir, tmp_path, capsys):
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{s}\t{t}\n" for s, t in generate_pairs(20, seed=99)), encoding="utf-8")
    assert main(["eval", str(run_dir), "--data", str(data)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["pairs"] == 20 and 0.0 <= scores["bleu"] <= 100.0


def test_resume_continues_from_latest(run_dir, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY, encoding="utf-8")
    assert main(["train", str(config), "--resume", str(run_dir), "--quiet", "--set", "train.steps=25"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 25


def test_bad_override_and_missing_checkpoint_are_clear(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY, encoding="utf-8")
    assert main(["train", str(config), "--set", "model.moe.top_k=99", "--quiet"]) == 2
    assert "model.moe.top_k: must be <= n_experts" in capsys.readouterr().err
    assert main(["translate", str(tmp_path / "nothing"), "hi"]) == 1
    assert "no such checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_learns_the_generated_task(tmp_path, capsys):
    """A short demo run on the generated corpus beats a BLEU threshold on held-out pairs."""
    assert main(["demo", "--steps", "400", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    bleu = float(out.split("BLEU ")[1].split()[0])
    assert bleu > 40.0, out


def test_the_command_line_keeps_freed_memory_for_its_user(monkeypatch, capsys):
    """Every command applies the allocator setting (moeformer.runtime); importing the library does not."""
    calls = []
    monkeypatch.setattr("moeformer.cli.keep_freed_memory", lambda: calls.append(True) or True)
    assert main(["presets"]) == 0
    assert calls == [True] and "lm-small" in capsys.readouterr().out
