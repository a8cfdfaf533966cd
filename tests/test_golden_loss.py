"""Golden losses: debug-size models trained 20 steps on a fixed seed reproduce stored losses to 1e-4.

A refactor that changes numerics (initialisation order, loss, optimiser, routing, RNG use) fails
here loudly. The stored curves are in ``tests/data/golden_losses.json``; after a change that is
*meant* to alter numerics, regenerate them with::

    MOEFORMER_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_loss.py

and say in the commit why the curve moved. Regeneration is never on by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from moeformer import build_model, preset
from moeformer.train.config import TrainConfig
from moeformer.train.trainer import Batch, Trainer, TrainingTask

GOLDEN = Path(__file__).parent / "data" / "golden_losses.json"
REGEN = os.environ.get("MOEFORMER_REGEN_GOLDEN") == "1"
TOLERANCE = 1e-4
STEPS = 20
V = 24

# The debug sizes: the dense Llama-style LM and the same with DeepSeekMoE (shared + fine-grained
# routed experts, sigmoid scores, bias balancing and a balance loss).
MODELS = {
    "lm-tiny-dense": {},
    "lm-tiny-deepseekmoe": {
        "moe": {
            "kind": "deepseek",
            "n_experts": 4,
            "top_k": 2,
            "n_shared": 1,
            "bias_update_rate": 1e-3,
            "score": "sigmoid",
            "balance_loss": 0.01,
        }
    },
}


def copy_task() -> TrainingTask:
    """Sequences whose second half repeats the first, fixed per epoch by its own generator."""

    def batches(epoch: int) -> list[Batch]:
        g = torch.Generator().manual_seed(1000 + epoch)
        out = []
        for _ in range(4):
            half = torch.randint(3, V, (8, 6), generator=g)
            seq = torch.cat([half, half], dim=1)
            out.append(Batch({"tokens": seq[:, :-1]}, seq[:, 1:], n_tokens=seq[:, 1:].numel()))
        return out

    return TrainingTask(train_batches=batches, valid_batches=batches(-1), meta={"config": {}}, pad_id=0)


@pytest.fixture
def deterministic():
    """One intra-op thread and deterministic kernels, restored afterwards."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(strict)
    torch.set_num_threads(threads)


def train_losses(name: str, run_dir: Path) -> list[float]:
    torch.manual_seed(0)
    model = build_model(preset("lm-tiny", vocab_size=V, dropout=0.1, **MODELS[name]))
    config = TrainConfig(
        steps=STEPS, lr=3e-3, warmup_steps=4, eval_every=STEPS, save_every=STEPS, log_every=1, seed=0, device="cpu"
    )
    result = Trainer(model, copy_task(), config, run_dir, progress=False).train()
    return [float(m["loss"]) for m in result.metrics]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_losses_match_the_stored_curve(name, tmp_path, deterministic):
    losses = train_losses(name, tmp_path)
    assert len(losses) == STEPS
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if REGEN:
        stored[name] = [round(x, 7) for x in losses]
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN.name}[{name}]")
    assert name in stored, f"no golden curve for {name}: run with MOEFORMER_REGEN_GOLDEN=1"
    golden = stored[name]
    assert len(golden) == STEPS
    worst = max(range(STEPS), key=lambda i: abs(losses[i] - golden[i]))
    assert abs(losses[worst] - golden[worst]) <= TOLERANCE, (
        f"{name}: step {worst + 1} loss {losses[worst]:.7f}, stored {golden[worst]:.7f}; every step: {losses}"
    )
