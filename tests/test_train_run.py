"""`moeformer train` as a user runs it: Ctrl-C / SIGTERM save and say how to continue, run
directories are locked and never silently reused, and resumed runs log each step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeformer.cli import main
from moeformer.train.checkpoint import read_checkpoint

CONFIG = """
[model]
preset = "lm-tiny"
vocab_size = 40
d_model = 32
n_layers = 2
max_seq_len = 32
dropout = 0.0
[model.attention]
n_heads = 2
[model.ffn]
d_ff = 64
[model.moe]
kind = "deepseek"
n_experts = 4
top_k = 2
expert_hidden = 16
n_shared = 1
[data]
corpus = "text"
path = "text.txt"
tokenizer = "char"
seq_len = 32
valid_size = 8
test_size = 8
[train]
steps = {steps}
batch_tokens = 256
lr = 1e-3
warmup_steps = 2
eval_every = {eval_every}
eval_batches = 2
save_every = {save_every}
log_every = 1
bleu_samples = 0
"""


def write_config(root: Path, steps: int = 100_000, eval_every: int = 1_000_000, save_every: int = 1_000_000) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(400)]
    (root / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = root / "tiny.toml"
    config.write_text(CONFIG.format(steps=steps, eval_every=eval_every, save_every=save_every), encoding="utf-8")
    return config


def start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "moeformer", "train", *args, "--quiet"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while len(rows(run)) < n:
        if proc.poll() is not None:
            raise AssertionError(f"train exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("no training progress")
        time.sleep(0.05)


@pytest.mark.parametrize(("sig", "code", "times"), [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 1),
                                                    (signal.SIGINT, 130, 2)])  # fmt: skip
def test_signal_saves_a_checkpoint_and_says_how_to_continue(tmp_path, sig, code, times):
    config = write_config(tmp_path)
    run = tmp_path / "run"
    proc = start(str(config), "--out", str(run), cwd=tmp_path)
    wait_for_rows(run, 3, proc)
    for _ in range(times):  # a second Ctrl-C while saving changes nothing
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    ckpt = read_checkpoint(run, which="latest")
    step = ckpt.meta["step"]
    assert last == f"interrupted at step {step}; saved {run}/checkpoints/step-{step:08d}; continue with: " \
                   f"moeformer train --resume {run}"
    assert ckpt.path == (run / "checkpoints" / f"step-{step:08d}").resolve()
    assert "Traceback" not in err
    assert not (run / ".lock").exists()
    # --resume alone (the run's own config) continues from that step
    os.chdir(tmp_path)
    assert main(["train", "--resume", str(run), "--set", f"train.steps={step + 2}", "--quiet"]) == 0
    steps = [r["step"] for r in rows(run) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == step + 2


def test_a_second_run_on_a_locked_directory_is_refused(tmp_path):
    config = write_config(tmp_path)
    run = tmp_path / "run"
    first = start(str(config), "--out", str(run), cwd=tmp_path)
    wait_for_rows(run, 1, first)
    lock = json.loads((run / ".lock").read_text())
    assert lock["pid"] == first.pid
    for args in ([str(config), "--out", str(run)], ["--resume", str(run)], [str(config), "--out", str(run), "--force"]):
        second = start(*args, cwd=tmp_path)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 1 and f"is in use by pid {first.pid}" in err, err
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=300)
    assert first.returncode == 130


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, steps=2)
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"}))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    assert f"took over the lock of {run} left by pid {dead.pid}" in capsys.readouterr().err
    assert not (run / ".lock").exists()


def test_reusing_a_run_directory_needs_resume_or_force(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, steps=3)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--force" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing appended, best not repointed
    assert main(["train", str(config), "--out", str(run), "--quiet", "--force"]) == 0
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3]  # the old run's rows are gone


def test_force_does_not_replace_a_foreign_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, steps=2)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("years of work")
    assert main(["train", str(config), "--out", str(thesis), "--quiet", "--force"]) == 1
    assert "does not look like a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.txt"]


def test_resume_with_another_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, steps=2)
    assert main(["train", str(config), "--out", "run", "--quiet"]) == 0
    assert main(["train", str(config), "--resume", "run", "--out", "other", "--quiet"]) == 2
    assert "--out other cannot move it" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_warmup_longer_than_training_is_warned(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, steps=1)
    assert main(["train", str(config), "--out", "run", "--quiet", "--set", "train.warmup_steps=5"]) == 0
    err = capsys.readouterr().err
    assert "warning: train.warmup_steps = 5 is more than train.steps = 1" in err
    assert f"data: {tmp_path / 'text.txt'}: 400 lines read" in err  # the data report, at every start


def check_run_is_consistent(run: Path) -> None:
    """Every checkpoint loads, latest/best name complete checkpoints, metrics.jsonl parses."""
    from moeformer.inference import load_model
    from moeformer.train.checkpoint import load_trainer_state

    for ckpt_dir in sorted((run / "checkpoints").glob("step-*")):
        load_model(ckpt_dir)
        load_trainer_state(read_checkpoint(ckpt_dir))
    for pointer in ("latest", "best"):
        if (run / pointer).exists():
            load_model(read_checkpoint(run, which=pointer).path)
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line)


def _latest_step(run: Path) -> int:
    try:
        return read_checkpoint(run, which="latest").meta["step"]
    except Exception:  # noqa: BLE001  not written yet
        return 0


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, seconds: float) -> None:
    """Poll until ``run``'s latest checkpoint is at ``step`` or later, the process ends or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while _latest_step(run) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.slow
def test_twenty_kills_at_random_moments_lose_nothing(tmp_path):
    """SIGKILL (no chance to clean up) at random moments of a run that saves every step; after
    each kill the run directory is consistent, and resuming until the end gives the losses of an
    uninterrupted run, each step logged once."""
    import random

    steps = 300
    config = write_config(tmp_path, steps=steps, eval_every=7, save_every=1)
    reference = start(str(config), "--out", str(tmp_path / "reference"), cwd=tmp_path)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    rng, run, kills = random.Random(0), tmp_path / "run", 0
    while kills < 20:
        resuming = (run / "latest").exists()
        args = ["--resume", str(run)] if resuming else [str(config), "--out", str(run), "--force"]
        saved = read_checkpoint(run, which="latest").meta["step"] if resuming else 0
        proc = start(*args, cwd=tmp_path)
        # the run advances by a few steps per kill, counted in steps, not seconds: on a fast quiet
        # machine half a second is dozens of steps, and the run would end before the 20th kill
        if kills % 4 == 3:  # now and then during start-up: importing, reading, resuming
            _wait_for_step(proc, run, saved + 1, rng.uniform(0.0, 3.0))
        else:  # else once this process has saved a few checkpoints, at a random moment of a step
            _wait_for_step(proc, run, saved + rng.randint(1, 6), 300.0)
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is not None:
            pytest.fail(f"the run ended by itself after {kills} kills ({proc.stderr.read()})")
        proc.kill()
        proc.wait()
        kills += 1
        check_run_is_consistent(run)
    final = start("--resume", str(run), cwd=tmp_path)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    check_run_is_consistent(run)
    got = [(r["step"], r["loss"]) for r in rows(run) if "loss" in r]
    want = [(r["step"], r["loss"]) for r in rows(tmp_path / "reference") if "loss" in r]
    assert [s for s, _ in got] == list(range(1, steps + 1))
    assert [s for s, _ in want] == list(range(1, steps + 1))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-6, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["SIGTERM-to-torchrun", "Ctrl-C-to-the-process-group"])
def test_torchrun_stops_every_rank_at_one_step(tmp_path, group):
    """As schedulers stop jobs (SIGTERM to torchrun, which passes it on to its workers) and as a
    terminal does (SIGINT to torchrun and both workers at once): both ranks save one checkpoint
    at the same step, and the note is said once."""
    config = write_config(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "moeformer", "train", str(config), "--out", str(run), "--quiet"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    wait_for_rows(run, 3, proc)
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    name = "SIGINT" if group else "SIGTERM"
    notes = [line for line in err.splitlines() if line.startswith("interrupted at step")]
    assert len(notes) == 1, err
    assert sum(line.startswith(f"{name} received") for line in err.splitlines()) == 1, err
    step = read_checkpoint(run, which="latest").meta["step"]
    assert notes[0].startswith(f"interrupted at step {step}; saved {run}/checkpoints/step-{step:08d}")
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == [f"step-{step:08d}"]
    logged = [r["step"] for r in rows(run) if "loss" in r]
    assert logged == list(range(1, step + 1))
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_an_interrupted_fsdp_expert_parallel_run_resumes_in_one_process(tmp_path):
    """torchrun, 2 ranks, FSDP2 x expert parallelism 2, stopped by SIGTERM: the checkpoint it
    saves (DCP shards) continues in one process from the next step, as ``--resume`` with the
    layout changed by ``--set``."""
    config = write_config(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "moeformer", "train", str(config), "--out", str(run), "--quiet",
         "--set", "train.parallel=fsdp", "--set", "train.expert_parallel=2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    wait_for_rows(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    ckpt = read_checkpoint(run, which="latest")
    step = ckpt.meta["step"]
    assert (ckpt.path / "dcp" / ".metadata").is_file(), err
    resumed = start("--resume", str(run), "--set", "train.parallel=ddp", "--set", "train.expert_parallel=1",
                    "--set", f"train.steps={step + 3}", cwd=tmp_path)  # fmt: skip
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    logged = [r["step"] for r in rows(run) if "loss" in r]
    assert logged == list(range(1, step + 4))
    assert read_checkpoint(run, which="latest").meta["step"] == step + 3
