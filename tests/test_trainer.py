"""The training loop on an in-memory task: it learns, resumes exactly, stops on NaN, checkpoints safely."""

from __future__ import annotations

import json

import pytest
import torch

from moeformer import build_model, preset
from moeformer.hooks import add_hooks
from moeformer.train.checkpoint import CheckpointError, load_weights, read_checkpoint
from moeformer.train.config import TrainConfig
from moeformer.train.trainer import Batch, Trainer, TrainingDiverged, TrainingTask

V = 20


def copy_task(n_batches: int = 4) -> TrainingTask:
    """Sequences whose second half repeats the first: learnable by a tiny LM."""

    def batches(epoch: int) -> list[Batch]:
        g = torch.Generator().manual_seed(1000 + epoch)
        out = []
        for _ in range(n_batches):
            half = torch.randint(3, V, (8, 6), generator=g)
            seq = torch.cat([half, half], dim=1)
            out.append(Batch({"tokens": seq[:, :-1]}, seq[:, 1:], n_tokens=seq[:, 1:].numel()))
        return out

    return TrainingTask(train_batches=batches, valid_batches=batches(-1), meta={"config": {}}, pad_id=0)


def lm(dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    config = preset(
        "lm-tiny",
        vocab_size=V,
        dropout=dropout,
        moe={
            "kind": "deepseek",
            "n_experts": 4,
            "top_k": 2,
            "n_shared": 1,
            "bias_update_rate": 1e-3,
            "score": "sigmoid",
            "balance_loss": 0.01,
        },
    )
    return build_model(config)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=12, lr=3e-3, warmup_steps=2, eval_every=6, save_every=6, log_every=1, label_smoothing=0.1)
    return TrainConfig(**{**base, **kw})


def test_loss_goes_down(tmp_path):
    result = Trainer(
        lm(0.0), copy_task(), cfg(steps=40, eval_every=40, save_every=40), tmp_path, progress=False
    ).train()
    first, last = result.metrics[0]["nll"], result.metrics[-1]["nll"]
    assert last < 0.8 * first
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_loss" in r for r in rows) and any("max_over_mean_load" in r for r in rows)
    loads = [r["expert_load"] for r in rows if "expert_load" in r]
    assert loads and set(loads[-1]) == {"layers.0", "layers.1"}  # every MoE layer, every logged step
    for shares in loads[-1].values():
        assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-3 and min(shares) >= 0


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    """Stop after 6 of 12 updates, resume: updates 7-12 have exactly the uninterrupted losses."""
    full = Trainer(lm(), copy_task(n_batches=5), cfg(), tmp_path / "full", progress=False).train()
    Trainer(lm(), copy_task(n_batches=5), cfg(steps=6), tmp_path / "half", progress=False).train()
    resumed = Trainer(lm(), copy_task(n_batches=5), cfg(), tmp_path / "half", progress=False)
    resumed.resume(read_checkpoint(tmp_path / "half", which="latest"))
    assert resumed.step == 6
    tail = resumed.train()
    assert [m["loss"] for m in tail.metrics] == [m["loss"] for m in full.metrics[6:]]
    biases = [b for n, b in resumed.model.named_buffers() if n.endswith("expert_bias")]
    assert biases and any(bool(b.abs().sum() > 0) for b in biases)  # the balancing bias moved and survived


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    model = lm(0.0)
    trainer = Trainer(model, copy_task(), cfg(steps=10, save_every=2, eval_every=100), tmp_path, progress=False)
    calls = {"n": 0}

    def poison(x, name):
        calls["n"] += 1
        return x * float("nan") if calls["n"] > 4 else None  # one call per update: 4 updates pass

    with (
        add_hooks(model, {"layers.0.mlp_out": poison}),
        pytest.raises(TrainingDiverged, match=r"at step 5; last good checkpoint: .*step-00000004"),
    ):
        trainer.train()


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    model = lm()
    Trainer(model, copy_task(), cfg(steps=2, eval_every=2), tmp_path, progress=False).train()
    ckpt = read_checkpoint(tmp_path)
    again = lm()
    load_weights(again, ckpt)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())

    weights = ckpt.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable or truncated safetensors"):
        load_weights(lm(), ckpt)

    other = build_model(preset("lm-tiny", vocab_size=V + 5))
    Trainer(model, copy_task(), cfg(steps=2, eval_every=2), tmp_path / "b", progress=False).train()
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_weights(other, read_checkpoint(tmp_path / "b"))

    (ckpt.path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(ckpt.path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing")


def test_old_checkpoints_pruned_but_best_kept(tmp_path):
    Trainer(
        lm(0.0), copy_task(), cfg(steps=12, eval_every=2, save_every=2, keep_last=1), tmp_path, progress=False
    ).train()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    best = (tmp_path / "best").read_text().strip().split("/")[-1]
    latest = (tmp_path / "latest").read_text().strip().split("/")[-1]
    assert latest == "step-00000012" and best in kept and latest in kept and len(kept) <= 2


def test_a_kill_while_pruning_leaves_only_whole_checkpoints(tmp_path, monkeypatch):
    """SIGKILL in the middle of deleting an old checkpoint (simulated: rmtree removes one file and
    stops) must not leave checkpoints/step-N half-deleted under its name (found by the 20-SIGKILL test)."""
    import shutil

    real_rmtree = shutil.rmtree

    def killed_half_way(path, ignore_errors=False):  # noqa: ARG001
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
        if not any(p.name == "model.safetensors" for p in files):
            return real_rmtree(path, ignore_errors=True)  # staging directories and the like
        next(p for p in files if p.name == "model.safetensors").unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    trainer = Trainer(lm(0.0), copy_task(), cfg(steps=12, save_every=2, keep_last=1), tmp_path, progress=False)
    with pytest.raises(SystemExit):
        trainer.train()
    steps = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert steps, "nothing saved before the first prune"
    for ckpt in steps:
        load_weights(lm(0.0), read_checkpoint(ckpt))


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional; metrics.jsonl is always written")
    Trainer(lm(0.0), copy_task(), cfg(steps=2, eval_every=2), tmp_path, progress=False).train()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_deadline_leaves_room_for_the_final_evaluation_and_what_follows(tmp_path):
    """With a deadline, training stops once another update would eat into the time that the
    final evaluation and the caller's reserve (test decoding) need; the final evaluation still runs."""
    import time

    config = cfg(steps=50, eval_every=100, save_every=100, max_minutes=10_000.0)  # no machine is that slow
    roomy = Trainer(lm(0.0), copy_task(), config, tmp_path / "a", progress=False,
                    deadline=time.monotonic() + 600_000, reserve=lambda eval_s: 0.0).train()  # fmt: skip
    assert roomy.stopped_by == "steps" and roomy.step == 50
    reserve_calls: list[float] = []

    def reserve(eval_seconds: float) -> float:
        reserve_calls.append(eval_seconds)
        return 1e7  # test decoding that would not fit: stop at once

    tight = Trainer(lm(0.0), copy_task(), config, tmp_path / "b", progress=False,
                    deadline=time.monotonic() + 600_000, reserve=reserve).train()  # fmt: skip
    assert tight.stopped_by == "max_minutes" and tight.step == 1
    assert len(tight.evals) == 1 and read_checkpoint(tmp_path / "b").meta["step"] == 1


def test_checkpoints_are_fsynced_and_readable_by_others(tmp_path, monkeypatch):
    import os
    import stat

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    Trainer(lm(0.0), copy_task(), cfg(steps=1, eval_every=1), tmp_path, progress=False).train()
    ckpt = read_checkpoint(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "checkpoint.json", "trainer.pt"):
        assert stat.S_IMODE((ckpt.path / name).stat().st_mode) == 0o666 & ~umask, name  # safetensors: 0600
    assert len(synced) >= 3 + 2  # the three files, the checkpoint directory and its parent at least
