"""Interventions on the residual stream (Arditi et al. 2024, section 2.4).

- Directional ablation: x <- x - r_hat r_hat^T x, at the input of every layer and on the output
  of every component that writes to the residual stream, at every position. The model can then
  never represent the direction (eq. 4 of the paper).
- Activation addition: x^(l) <- x^(l) + r^(l) at the input of one layer l, at every position;
  r keeps its norm (the difference of means it came from), which induces refusal (eq. 3).

Both are context managers whose hooks are removed on exit, even after an error; they apply to
every forward inside the block, including each step of cached generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from moeformer.refusal.lm import ChatLM, RefusalError, Site

Edit = Callable[[Tensor], Tensor]


def unit(direction: Tensor) -> Tensor:
    """r / ||r||, refusing a zero (or vanishing) direction, whose ablation would be meaningless."""
    # a fresh contiguous copy: a vector read from a memory-mapped file (or a view into a larger
    # tensor) can round its norm differently in the last bit, and edits must not depend on that
    direction = direction.float().clone(memory_format=torch.contiguous_format)
    norm = direction.norm()
    if not torch.isfinite(norm) or norm < 1e-8:
        raise RefusalError(f"the direction has norm {float(norm):.3g}; ablation needs a non-zero direction")
    return direction / norm


def project_out(x: Tensor, r_hat: Tensor) -> Tensor:
    """x: (..., D) -> x - (x . r_hat) r_hat, computed in float32 and returned in x's dtype."""
    xf = x.float()
    return (xf - (xf @ r_hat).unsqueeze(-1) * r_hat).to(x.dtype)


@contextmanager
def edit_sites(sites: list[Site], edit: Edit) -> Iterator[None]:
    """Replace the residual-stream tensor at each site by ``edit(tensor)`` inside the block."""
    handles = []
    try:
        for site in sites:
            if site.where == "input":
                handles.append(site.module.register_forward_pre_hook(_input_hook(edit), with_kwargs=True))
            else:
                handles.append(site.module.register_forward_hook(_output_hook(edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablate(lm: ChatLM, direction: Tensor) -> Iterator[None]:
    """Directional ablation of ``direction`` (any norm) everywhere in ``lm``."""
    r_hat = unit(lm.check_direction(direction))
    with edit_sites(lm.layer_sites() + lm.writer_sites(), lambda x: project_out(x, r_hat)):
        yield


@contextmanager
def ablate_partially(lm: ChatLM, direction: Tensor, alphas: Sequence[float]) -> Iterator[None]:
    """x <- x - alpha_l (x . r_hat) r_hat on the output of every writer of layer l, and with alpha_0 on
    what enters layer 0 (the embedding): exactly what a weight edit with per-layer strengths
    computes (:class:`moeformer.refusal.edits.StrengthKernel`). alpha = 1 everywhere is :func:`ablate`."""
    r_hat = unit(lm.check_direction(direction))
    writers = lm.writer_sites()
    if len(alphas) != lm.n_layers or len(writers) != 2 * lm.n_layers:
        raise RefusalError(f"one strength per layer ({lm.n_layers}) is needed, got {len(alphas)}")

    def scaled(alpha: float) -> Edit:
        return lambda x: (x.float() - alpha * (x.float() @ r_hat).unsqueeze(-1) * r_hat).to(x.dtype)

    with ExitStack() as stack:
        stack.enter_context(edit_sites([lm.layer_sites()[0]], scaled(alphas[0])))
        for layer, alpha in enumerate(alphas):
            stack.enter_context(edit_sites(writers[2 * layer : 2 * layer + 2], scaled(alpha)))
        yield


@contextmanager
def add(lm: ChatLM, direction: Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Activation addition: ``coeff * direction`` added to the input of ``layer`` at every position."""
    r = lm.check_direction(direction) * coeff
    if not 0 <= layer < lm.n_layers:
        raise RefusalError(f"layer must be in 0..{lm.n_layers - 1}, got {layer}")
    with edit_sites([lm.layer_sites()[layer]], lambda x: (x.float() + r).to(x.dtype)):
        yield


@dataclass(frozen=True)
class Intervention:
    """One condition of an experiment: nothing, ablation of r, or addition of r at a layer."""

    kind: Literal["baseline", "ablation", "actadd"]
    direction: Tensor | None = None
    layer: int | None = None

    @contextmanager
    def apply(self, lm: ChatLM) -> Iterator[None]:
        with ExitStack() as stack:
            if self.kind == "ablation":
                stack.enter_context(ablate(lm, _need(self.direction, "ablation")))
            elif self.kind == "actadd":
                if self.layer is None:
                    raise RefusalError("activation addition needs a layer")
                stack.enter_context(add(lm, _need(self.direction, "actadd"), self.layer))
            elif self.kind != "baseline":
                raise RefusalError(f"intervention kind must be baseline, ablation or actadd, not {self.kind!r}")
            yield


BASELINE = Intervention("baseline")


def _need(direction: Tensor | None, kind: str) -> Tensor:
    if direction is None:
        raise RefusalError(f"{kind} needs a direction")
    return direction


def _input_hook(edit: Edit) -> Callable:
    def hook(module: object, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
        raise RefusalError(f"cannot find the residual stream among the inputs of {type(module).__name__}")

    return hook


def _output_hook(edit: Edit) -> Callable:
    def hook(module: object, args: tuple, output: object) -> object:
        if isinstance(output, Tensor):
            return edit(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (edit(output[0]), *output[1:])
        raise RefusalError(f"cannot find the residual-stream tensor in the output of {type(module).__name__}")

    return hook
