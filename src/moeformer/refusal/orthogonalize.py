"""Weight orthogonalization (Arditi et al. 2024, section 4.1): bake directional ablation into the weights.

Every matrix that writes to the residual stream is replaced by W_out <- W_out - r_hat r_hat^T W_out
(and every such bias b <- b - r_hat r_hat^T b): the embedding, each attention output projection,
each MLP / routed expert / shared expert down projection. No component can then write along
r_hat, which is what ablating it at every layer does, so the edited model computes the same
function as the hook-ablated one without any hook.

Tied input/output embeddings are untied first: the output layer reads the (normed) residual
stream and must keep its original weights. Variants of the edit (``projected``,
``norm-preserving``, a per-layer strength kernel): :mod:`moeformer.refusal.edits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moeformer.publish import staged_dir
from moeformer.refusal.edits import (
    Method,
    StrengthKernel,
    check_method,
    edit_vectors,
    projected_direction,
    writer_layer,
)
from moeformer.refusal.interventions import edit_sites, unit
from moeformer.refusal.lm import ChatLM, PromptBatch, RefusalError
from moeformer.results import check_output


@dataclass
class Orthogonalized:
    edited: list[str]  # names of the tensors changed
    untied: bool  # whether tied embeddings had to be split
    leak: float | None  # max |x . r_hat| / ||x|| over the residual stream of a check prompt (should be ~0);
    # None with a strength kernel, which leaves part of the direction on purpose
    method: str = "orthogonal"


@torch.no_grad()
def orthogonalize_weights(
    lm: ChatLM,
    direction: Tensor,
    *,
    method: Method = "orthogonal",
    kernel: StrengthKernel | None = None,
    harmless_mean: Tensor | None = None,
) -> tuple[list[str], bool]:
    """Edit ``lm.model`` in place; returns the edited tensor names and whether embeddings were untied.

    ``method`` and ``kernel``: see :mod:`moeformer.refusal.edits`; ``projected`` needs the harmless
    mean activation at the direction's layer (``harmless_mean``, (d_model,)).
    """
    r_hat = unit(effective_direction(lm, direction, method, harmless_mean))
    writers = lm.writer_weights()  # may refuse (post-norm, sinusoidal positions) before anything changes
    untied = lm.untie_embeddings()
    for w in writers:
        alpha = 1.0 if kernel is None else kernel.alpha(writer_layer(w.name))
        moved = w.param.data.movedim(w.axis, -1)
        edited = edit_vectors(moved.float(), r_hat, alpha=alpha, preserve_norm=method == "norm-preserving")
        moved.copy_(edited.to(moved.dtype))
    return [w.name for w in writers], untied


def effective_direction(lm: ChatLM, direction: Tensor, method: str, harmless_mean: Tensor | None) -> Tensor:
    """The direction the edit removes: ``direction``, or for ``projected`` its part orthogonal to the harmless mean."""
    check_method(method)
    direction = lm.check_direction(direction)
    if method != "projected":
        return direction
    if harmless_mean is None:
        raise RefusalError("the projected method needs the harmless mean at the direction's layer: give an "
                           "extract output directory as --direction (its candidates.safetensors holds it)")  # fmt: skip
    return projected_direction(direction, lm.check_direction(harmless_mean))


@torch.no_grad()
def residual_leak(lm: ChatLM, batch: PromptBatch, direction: Tensor) -> float:
    """Largest |x . r_hat| / ||x|| over real tokens at every layer's input and after the last layer."""
    r_hat = unit(lm.check_direction(direction))
    worst = torch.zeros((), device=lm.device)

    def measure(x: Tensor) -> Tensor:
        nonlocal worst
        real = ~batch.padding_mask
        xf = x.float()[real] if x.shape[:2] == real.shape else x.float().reshape(-1, x.shape[-1])
        ratio = (xf @ r_hat).abs() / xf.norm(dim=-1).clamp_min(1e-12)
        worst = torch.maximum(worst, ratio.max())
        return x

    with edit_sites(lm.layer_sites() + [lm.final_site()], measure):
        lm.forward_logits(batch)
    return float(worst)


def orthogonalize(
    lm: ChatLM,
    direction: Tensor,
    check_prompts: list[str],
    *,
    tolerance: float | None = None,
    method: Method = "orthogonal",
    kernel: StrengthKernel | None = None,
    harmless_mean: Tensor | None = None,
) -> Orthogonalized:
    """Orthogonalize in place, then verify on ``check_prompts`` that nothing writes along r_hat
    (the direction actually removed: for ``projected``, r's part orthogonal to the harmless mean).

    tolerance: the largest |cos(x, r_hat)| accepted; default 1e-4 for float32 weights, 1e-2 for
    16-bit ones (rounding the edited weights back to 16 bits leaves a small component). With a
    strength ``kernel`` the check is skipped: a partial edit leaves part of the direction by design.

    Raises RefusalError when some component still writes along the direction (an architecture
    whose residual writers this module does not know, e.g. norms after each sublayer).
    """
    if tolerance is None:
        tolerance = 1e-4 if next(lm.model.parameters()).dtype in (torch.float32, torch.float64) else 1e-2
    removed = effective_direction(lm, direction, method, harmless_mean)
    edited, untied = orthogonalize_weights(lm, direction, method=method, kernel=kernel, harmless_mean=harmless_mean)
    if kernel is not None:
        return Orthogonalized(edited, untied, None, method)
    leak = residual_leak(lm, lm.batch(check_prompts), removed)
    if leak > tolerance:
        raise RefusalError(
            f"after orthogonalizing {len(edited)} tensors the residual stream of this {lm.family} model still has "
            f"a component along the direction (|cos| up to {leak:.2e} > {tolerance:g}): some component writes to "
            "the residual stream in a way weight orthogonalization cannot remove (e.g. a norm after each sublayer); "
            "use hook-based ablation for it"
        )
    return Orthogonalized(edited, untied, leak, method)


def save_model(lm: ChatLM, out: str | Path, *, source: str | Path | None = None, force: bool = False) -> Path:
    """``lm`` in its source's format (transformers or moeformer) as one published directory.

    ``out`` may not be or hold ``source``; ``force`` replaces an old model or output of this project.
    """
    check_output(out, force=force, source=source, model_output=True)
    with staged_dir(out, force=force) as tmp:  # fsynced and swapped in once every file is written
        lm.save(tmp)
    return Path(out)
