"""Named hook points: read and edit activations without per-model lookup tables.

Every block owns identity modules at stable names (``resid_pre``, ``attn_out``,
``cross_attn_out``, ``mlp_out``, ``resid_post``; MoE layers add ``router_logits``), e.g.
``layers.3.resid_post`` in a :class:`~moeformer.models.decoder.DecoderLM` or
``decoder.2.attn_out`` in a :class:`~moeformer.models.seq2seq.Seq2SeqTransformer`.

    with add_hooks(model, {"layers.*.resid_post": lambda x, name: x - proj(x)}):
        logits = model(tokens).logits   # every hook is removed on exit, even after an error

A hook receives (activation, name) and returns a replacement tensor or None (keep it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn

HookFn = Callable[[Tensor, str], "Tensor | None"]


class HookPoint(nn.Module):
    """Identity on a named activation; forward hooks attached here can read or replace it."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Every hook point of ``model`` by its dotted name, in forward order of the modules."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


def resolve(model: nn.Module, patterns: Iterator[str] | list[str]) -> dict[str, list[str]]:
    """Map each glob pattern (``layers.*.mlp_out``) to the hook point names it matches.

    Raises KeyError, before any hook is attached, for a pattern that matches nothing.
    """
    names = list(hook_points(model))
    out = {}
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise KeyError(f"no hook point matches {pattern!r}; hook points are named like: {sample}")
        out[pattern] = matched
    return out


@contextmanager
def add_hooks(model: nn.Module, hooks: Mapping[str, HookFn]) -> Iterator[None]:
    """Attach ``{pattern: fn}`` for the duration of the block; always detached afterwards."""
    points = hook_points(model)
    resolved = resolve(model, list(hooks))
    handles = []
    try:
        for pattern, fn in hooks.items():
            for name in resolved[pattern]:
                handles.append(points[name].register_forward_hook(_wrap(fn, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record(model: nn.Module, patterns: list[str], *, detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Collect the activations at ``patterns`` into a dict filled during the block's forwards.

    A hook point that runs several times (incremental decoding) keeps its latest activation.
    """
    store: dict[str, Tensor] = {}

    def keep(x: Tensor, name: str) -> None:
        store[name] = x.detach() if detach else x

    with add_hooks(model, {p: keep for p in patterns}):
        yield store


def _wrap(fn: HookFn, name: str) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        return fn(output, name)

    return hook
