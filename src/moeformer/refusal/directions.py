"""Candidate refusal directions by difference in means (Arditi et al. 2024, section 2.3).

For each layer l and each post-instruction position i (the chat template's tokens after the
instruction, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``):

    mu_i^(l) = mean over harmful prompts of x_i^(l),   nu_i^(l) = the same over harmless ones,
    r_i^(l) = mu_i^(l) - nu_i^(l)

Means are streamed in float64 over batches: no activation is kept after its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moeformer.refusal.interventions import edit_sites
from moeformer.refusal.lm import ChatLM, RefusalError, iter_batches


@dataclass
class Candidates:
    """directions, harmful_mean, harmless_mean: (n_eoi, n_layers, d_model) float32."""

    directions: Tensor
    harmful_mean: Tensor
    harmless_mean: Tensor

    @property
    def positions(self) -> list[int]:
        """The negative token position of each row: -n_eoi .. -1."""
        n = self.directions.shape[0]
        return list(range(-n, 0))


@torch.no_grad()
def mean_activations(
    lm: ChatLM, instructions: Sequence[str], *, batch_size: int = 32, progress: bool = False, desc: str = "means"
) -> Tensor:
    """Mean residual stream at each layer's input over the eoi positions -> (n_eoi, n_layers, d_model)."""
    if not instructions:
        raise RefusalError(f"{desc}: no instructions to average over")
    n = lm.n_eoi
    sums = torch.zeros(n, lm.n_layers, lm.d_model, dtype=torch.float64, device=lm.device)

    def accumulate(layer: int):  # noqa: ANN202
        def keep(x: Tensor) -> Tensor:
            sums[:, layer] += x[:, -n:].double().sum(0)
            return x

        return keep

    with ExitStack() as stack:
        for layer, site in enumerate(lm.layer_sites()):
            stack.enter_context(edit_sites([site], accumulate(layer)))
        for chunk in tqdm(iter_batches(instructions, batch_size), desc=desc, disable=not progress, unit="batch"):
            lm.forward_logits(lm.batch(chunk))
    return (sums / len(instructions)).float()


def candidate_directions(
    lm: ChatLM,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> Candidates:
    """r_i^(l) = mean harmful - mean harmless, for every eoi position i and layer l."""
    mu = mean_activations(lm, harmful, batch_size=batch_size, progress=progress, desc="harmful means")
    nu = mean_activations(lm, harmless, batch_size=batch_size, progress=progress, desc="harmless means")
    return Candidates(mu - nu, mu, nu)
