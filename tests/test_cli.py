"""The command line end to end on the generated corpus: train -> checkpoint -> translate -> eval -> BLEU."""

from __future__ import annotations

import argparse
import errno
import io
import json
import subprocess
import sys

import pytest
from safetensors import SafetensorError

from moeformer.cli import build_parser, main
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


def test_the_command_line_keeps_freed_memory_for_its_user(monkeypatch, capsys):
    """Every command applies the allocator setting (moeformer.runtime); importing the library does not."""
    calls = []
    monkeypatch.setattr("moeformer.cli.keep_freed_memory", lambda: calls.append(True) or True)
    assert main(["presets"]) == 0
    assert calls == [True] and "lm-small" in capsys.readouterr().out


def test_translate_takes_options_before_and_after_the_texts(run_dir, capsys):
    texts = ["at 3:45 pm on May 2nd", "I have 3 books."]
    assert main(["translate", str(run_dir), "--beam", "1", *texts]) == 0
    before = capsys.readouterr().out
    assert main(["translate", str(run_dir), texts[0], "--beam", "1", texts[1], "--which", "best"]) == 0
    assert capsys.readouterr().out == before and len(before.splitlines()) == 2


def test_translate_answers_every_stdin_line_blank_ones_too(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("I have 3 books.\n\n  \nat 3:45 pm on May 2nd\r\n"))
    assert main(["translate", str(run_dir), "-", "--beam", "1"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 5 and lines[1] == lines[2] == lines[4] == ""  # 4 answers, then the final newline
    assert lines[0] and lines[3]


def test_a_long_input_is_translated_in_sentences_and_said_so(run_dir, capsys):
    text = " ".join(["I have 3 books."] * 20)
    assert main(["translate", str(run_dir), text, "--beam", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1
    assert "moeformer: note: input 1 has" in err and "limit of 64: translated as 20 sentences" in err


def _decoder_checkpoint(directory, make_lm) -> None:
    from moeformer.config import config_to_dict
    from moeformer.data.char_tokenizer import CharTokenizer
    from moeformer.data.tokenizer import TokenizerPair
    from moeformer.train.checkpoint import save_checkpoint

    tok = CharTokenizer.train(["abcdefghij "])
    lm = make_lm(vocab_size=tok.vocab_size)
    meta = {"config": {"model": config_to_dict(lm.config)}, "tokenizer": TokenizerPair(tok, tok).to_dict()}
    save_checkpoint(directory, 1, lm, meta, {}, best=True)


def test_the_wrong_model_kind_and_a_long_prompt_are_one_clear_line(run_dir, tmp_path, make_lm, capsys):
    assert main(["generate", str(run_dir), "--prompt", "hello"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moeformer: error: generate needs a decoder-only LM") and err.count("\n") == 1
    _decoder_checkpoint(tmp_path / "lm", make_lm)
    assert main(["translate", str(tmp_path / "lm"), "abc"]) == 1
    assert "translate needs an encoder-decoder (seq2seq) translation model" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "lm"), "--prompt", "abcdefghij " * 7]) == 1
    assert "the prompt has 77 tokens; the model reads at most 64 positions" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(tmp_path, make_lm, capsys, monkeypatch):
    _decoder_checkpoint(tmp_path / "lm", make_lm)
    assert main(["convert", str(tmp_path / "lm"), str(tmp_path / "hf")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    full = SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')
    errors = [full, OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "hf"))]
    for error in errors:
        monkeypatch.setattr("safetensors.torch.save_file", lambda *a, error=error, **k: _raise(error))
        capsys.readouterr()
        assert main(["convert", str(tmp_path / "lm"), str(tmp_path / "hf"), "--force"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("moeformer: error: ") and "No space left on device" in err and err.count("\n") == 1
        assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "lm"]  # no temporary directory left


def _raise(error: BaseException):
    raise error


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, make_lm, capsys, monkeypatch):
    _decoder_checkpoint(tmp_path / "lm", make_lm)
    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: _raise(KeyboardInterrupt()))
    assert main(["convert", str(tmp_path / "lm"), str(tmp_path / "hf")]) == 130
    assert capsys.readouterr().err == "moeformer: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]


# Subcommands whose options other modules define; their owners bring them under the test below.
HELP_CHECKED_ELSEWHERE: set[str] = set()


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subparsers(sub, (*path, name))


def options_without_help_or_default(parser: argparse.ArgumentParser) -> list[str]:
    """Arguments with no help text, and options whose help shows no default (flags excepted)."""
    formatter = parser._get_formatter()
    bad = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = formatter._get_help_string(action) or ""
        if not text.strip():
            bad.append(f"{name}: no help")
        elif action.option_strings and action.nargs != 0 and not action.required and "default" not in text:
            bad.append(f"{name}: help does not show the default")
    return bad


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    assert "No model logic" not in parser.description and "moeformer translate" in parser.description
    checked = 0
    for path, sub in subparsers(parser):
        if path[0] in HELP_CHECKED_ELSEWHERE:
            continue
        assert options_without_help_or_default(sub) == [], " ".join(path)
        checked += 1
    assert checked >= 7


def test_the_cli_starts_without_the_compiler_and_distributed_checkpoints():
    """Every command pays for its imports: torch._dynamo (~1.3 s; torch.compiler.disable as a
    decorator imports it) and torch.distributed.checkpoint (~0.8 s, with DTensor and sympy) are
    loaded only by the runs that use them."""
    heavy = ("torch._dynamo", "torch._inductor", "torch.distributed.checkpoint", "torch.distributed.tensor", "sympy")
    probe = "import sys, moeformer.cli; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert "moeformer.cli" in loaded
    assert [m for m in loaded if m.startswith(heavy)] == []
