"""`moeformer demo`: a fixed number of steps gives the same model, and the same BLEU, on every run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from moeformer.demo import DEMO_STEPS, DemoReport, demo_config


def run_demo(out, *args: str, threads: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(
        [sys.executable, "-m", "moeformer", "demo", "--quiet", "--out", str(out), *args],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip


def valid_losses(out) -> list[float]:
    lines = (out / "synthetic" / "metrics.jsonl").read_text().splitlines()
    return [row["valid_loss"] for row in map(json.loads, lines) if "valid_loss" in row]


def bleu_of(output: str) -> float:
    return float(re.search(r"BLEU (\d+\.\d)", output).group(1))


def test_the_demo_trains_fixed_steps_by_default_and_minutes_only_when_asked():
    fixed = demo_config("synthetic", None, None, None).train
    assert fixed.steps == DEMO_STEPS and fixed.max_minutes is None
    timed = demo_config("synthetic", None, 2.0, None).train
    assert timed.max_minutes == 2.0 and timed.steps > 100 * DEMO_STEPS


@pytest.mark.slow
def test_the_demo_gives_the_same_bleu_beside_a_busy_process(tmp_path):
    """Two short demo runs, the second beside a CPU-heavy process: the same validation loss to
    every bit and the same BLEU, to the digit (12 steps: the training is what a busy machine could
    change; more steps only cost CI time). The second goes to the same place: a new demo replaces
    the previous run, its metrics are not appended to the old ones."""
    quiet = run_demo(tmp_path, "--steps", "12", threads=1)
    assert quiet.returncode == 0, quiet.stderr
    quiet_losses = valid_losses(tmp_path)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = run_demo(tmp_path, "--steps", "12", threads=1)
    finally:
        hog.kill()
        hog.wait()
    assert busy.returncode == 0, busy.stderr
    assert bleu_of(busy.stdout) == bleu_of(quiet.stdout)
    assert valid_losses(tmp_path) == quiet_losses != []
    assert busy.stdout == quiet.stdout  # scores, translations and the run directory's name


@pytest.mark.slow
def test_the_demo_reaches_bleu_75(tmp_path):
    """The README's command as it is: default steps, held-out BLEU >= 75 (RESULTS.md has the value)."""
    done = run_demo(tmp_path)
    assert done.returncode == 0, done.stderr
    assert bleu_of(done.stdout) >= 75.0, done.stdout


def test_the_tatoeba_default_is_the_shared_data_beside_the_clone():
    """``moeformer demo --corpus tatoeba`` without $MOEFORMER_DATA reads ../shared/data, as the tests do
    (it pointed one folder too high, at /shared beside the clone's parent)."""
    from pathlib import Path

    from moeformer.demo import TATOEBA_DEFAULT

    repo = Path(__file__).resolve().parents[1]
    assert TATOEBA_DEFAULT.resolve() == (repo.parent / "shared" / "data" / "cmn-eng" / "cmn.txt").resolve()


def test_the_report_prints_both_scores_when_the_references_were_converted(tmp_path):
    """Tatoeba (data.zh_script = "simplified"): BLEU against the references as given, which mix
    scripts, and against their simplified form; the synthetic corpus has only the first."""
    base = dict(run_dir=tmp_path, parameters=10, steps=5, test_pairs=3, test_bleu=20.0, test_chrf=30.0)
    tatoeba = str(DemoReport("tatoeba", **base, test_bleu_simplified=25.5, test_chrf_simplified=33.3))
    assert "BLEU 20.0 (sacrebleu, zh tokenizer), chrF 30.0 against the references as given" in tatoeba
    assert "BLEU 25.5, chrF 33.3 against them in simplified script" in tatoeba
    assert bleu_of(tatoeba) == 20.0  # the first BLEU printed stays the as-given one
    synthetic = str(DemoReport("synthetic", **base))
    assert "simplified" not in synthetic and "chrF 30.0\n" in synthetic
