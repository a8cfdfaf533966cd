"""``torch.compile`` for moeformer models, with the dynamo setting their MoE layers need.

The routed experts run as a custom op whose output row count depends on the routing
(:mod:`moeformer.moe.expert_ops`); dynamo keeps such an op (and the boolean padding masks and
``bincount`` of the MoE losses) in the graph only with ``capture_dynamic_output_shape_ops``.
Without it each MoE layer breaks the graph. That flag is process-wide dynamo configuration, so
:func:`dynamo_settings` sets it only for the duration of a block and :class:`CompiledModel`
around each of its calls (compilation happens inside the first call and at recompiles): nothing
changes for other code in the process.

    forward = CompiledModel(model)   # model itself is untouched: same parameters, same names
    out = forward(tokens)            # compiled at the first call and when shapes change

With it, a decoder LM or encoder-decoder with dense, top-k or DeepSeekMoE FFNs, MHA or MLA,
padding, capacity and every auxiliary loss is one graph (``fullgraph=True`` holds; see
``tests/test_compile.py``). What still breaks it, running eagerly there with unchanged results:
experts with biases or the ``bmm`` kernel (their routing reads the per-expert counts on the
host; ``torch.compiler.disable`` marks that step) and expert parallelism (all-to-all split
sizes are read on the host; the trainer refuses ``compile`` with ``expert_parallel > 1``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

DYNAMO_SETTINGS: dict[str, Any] = {"capture_dynamic_output_shape_ops": True}


def dynamo_settings(**extra: Any) -> contextlib.AbstractContextManager:
    """The dynamo configuration moeformer's MoE layers compile under (and ``extra`` settings of
    the caller's), restored on exit."""
    return torch._dynamo.config.patch(**DYNAMO_SETTINGS, **extra)


class CompiledModel:
    """``torch.compile(module, **options)`` called under :func:`dynamo_settings`.

    Not an ``nn.Module``: save, load and evaluate ``module`` itself (its state-dict names have
    no ``_orig_mod.`` prefix); call this object for the compiled forward.
    """

    def __init__(self, module: nn.Module, **options: Any) -> None:
        self.module = module
        self.compiled = torch.compile(module, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with dynamo_settings():
            return self.compiled(*args, **kwargs)
