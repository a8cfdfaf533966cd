"""How a tensor that writes to the residual stream is edited: the paper's orthogonalization and its variants.

A writer tensor, its d_model axis moved last, is a stack of vectors v in R^D: what the component
can add to the residual stream (a column of an output projection, a row of the embedding, a
bias). With r_hat the unit refusal direction:

- ``orthogonal`` (Arditi et al. 2024, section 4.1):   v <- v - (v . r_hat) r_hat
- per-layer strength alpha_l (:class:`StrengthKernel`): v <- v - alpha_l (v . r_hat) r_hat; alpha = 1
  everywhere is ``orthogonal``. It equals scaling the component along r_hat of every writer's
  output by (1 - alpha_l), exactly (:func:`moeformer.refusal.interventions.ablate_partially`).
- ``norm-preserving``: the orthogonal edit, then each v rescaled to its old norm,
  v <- v' ||v|| / ||v'||: still orthogonal to r_hat, with every vector as long as before (the
  "norm-preserving" abliteration community tools report to damage models least). No hook
  computes the same function: it changes the weights beyond the removed direction.
- ``projected``: a choice of direction, then the orthogonal edit: r <- r - (r . m_hat) m_hat with m
  the harmless mean activation at the direction's layer, so that the edit leaves that mean, the
  model's typical state on ordinary prompts, untouched (m . r_hat = 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from moeformer.refusal.interventions import unit
from moeformer.refusal.lm import RefusalError

Method = Literal["orthogonal", "projected", "norm-preserving"]
METHODS: tuple[str, ...] = ("orthogonal", "projected", "norm-preserving")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class StrengthKernel:
    """Edit strength over depth, parameterised as p-e-w/heretic does: ``peak`` at layer
    ``peak_layer``, falling linearly to ``minimum`` at ``width`` layers from it, 0 beyond.

        alpha_l = peak + (minimum - peak) * |l - peak_layer| / width   if |l - peak_layer| <= width, else 0

    The embedding (what enters layer 0) gets alpha_0.
    """

    peak_layer: float
    width: float
    peak: float = 1.0
    minimum: float = 0.0

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise RefusalError(f"the kernel's width must be > 0 layers, got {self.width}")
        for name in ("peak", "minimum"):
            if not 0 <= getattr(self, name) <= 1:
                raise RefusalError(f"the kernel's {name} strength must be in [0, 1], got {getattr(self, name)}")

    def alpha(self, layer: int) -> float:
        distance = abs(layer - self.peak_layer)
        return 0.0 if distance > self.width else self.peak + (self.minimum - self.peak) * distance / self.width

    def alphas(self, n_layers: int) -> list[float]:
        return [self.alpha(layer) for layer in range(n_layers)]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise RefusalError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


def projected_direction(direction: Tensor, harmless_mean: Tensor) -> Tensor:
    """r minus its component along the harmless mean m: (d_model,) float32, orthogonal to m."""
    if harmless_mean.shape != direction.shape:
        raise RefusalError(f"the harmless mean has shape {tuple(harmless_mean.shape)}, the direction "
                           f"{tuple(direction.shape)}")  # fmt: skip
    m_hat = unit(harmless_mean)
    r = direction.float().clone(memory_format=torch.contiguous_format)  # see unit(): not a view of a file
    return r - (r @ m_hat) * m_hat


def writer_layer(name: str) -> int:
    """The layer a writer tensor belongs to by its name ("model.layers.3.mlp..." -> 3); 0 for the embedding."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else 0


def edit_vectors(vectors: Tensor, r_hat: Tensor, *, alpha: float = 1.0, preserve_norm: bool = False) -> Tensor:
    """vectors: (..., D) of any float dtype -> the edited vectors, float32, contiguous. See the module docstring.

    The arithmetic runs on a fresh contiguous float32 copy, so that the result does not depend on
    where the weights lie: the BLAS kernels' rounding can follow the memory alignment and strides
    (a tensor read from a memory-mapped safetensors file vs one torch allocated differed by 1 ulp),
    and the in-memory and the streamed edit must give the same bits.
    """
    vectors = vectors.float().clone(memory_format=torch.contiguous_format)
    edited = vectors - alpha * (vectors @ r_hat).unsqueeze(-1) * r_hat
    if preserve_norm:
        old, new = vectors.norm(dim=-1, keepdim=True), edited.norm(dim=-1, keepdim=True)
        edited = torch.where(new > 0, edited * (old / new.clamp_min(1e-30)), edited)
    return edited
