"""The grouped experts as two ``torch.library`` custom ops: one autograd node, opaque to dynamo.

``moeformer::experts_forward`` and ``moeformer::experts_backward`` wrap
:func:`~moeformer.moe.grouped.grouped_forward` and :func:`~moeformer.moe.grouped.grouped_backward`
(the hand-written backward; the same tensors are saved as without compilation).
Why custom ops: the forward sorts the assignments and reads the per-expert counts on the host
(``tolist``), so its row count V depends on the routing, and ``grouped_mm``'s meta kernel
accepts only bf16; traced op by op, dynamo would break the graph there. As custom ops with a
fake implementation that declares V as a new dynamic size, ``torch.compile(fullgraph=True)``
traces a whole MoE block and runs this step eagerly inside the compiled graph (dynamo must be
allowed ops with data-dependent output shapes: :func:`moeformer.compiled.dynamo_settings`).
Eager calls take an equivalent ``autograd.Function`` around the same two functions.

Shapes: N tokens, D model width, H expert hidden, E experts, K experts per token, V routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeformer.moe.grouped import grouped_backward, grouped_forward


@torch.library.custom_op("moeformer::experts_forward", mutates_args=())
def experts_forward(
    x: Tensor, w_up: Tensor, w_down: Tensor, index: Tensor, weights: Tensor, activation: str, kernel: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> out (N, D), order (V,), offsets (E,), h (V, 2H or H), silu (V, H) or (0,)."""
    return grouped_forward(x, w_up, w_down, index, weights, activation, kernel)[0]


@experts_forward.register_fake
def _experts_forward_fake(
    x: Tensor, w_up: Tensor, w_down: Tensor, index: Tensor, weights: Tensor, activation: str, kernel: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    V = torch.library.get_ctx().new_dynamic_size()  # assignments not dropped: known only at run time
    E, first = w_up.shape[0], w_up.shape[1]
    silu = x.new_empty(V, first // 2) if activation == "swiglu" else x.new_empty(0)
    offsets = index.new_empty(E, dtype=torch.int32)
    return x.new_empty(x.shape), index.new_empty(V), offsets, x.new_empty(V, first), silu


@torch.library.custom_op("moeformer::experts_backward", mutates_args=())
def experts_backward(
    grad_out: Tensor,
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    weights: Tensor,
    order: Tensor,
    offsets: Tensor,
    h: Tensor,
    silu: Tensor,
    activation: str,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> gradients of x (N, D), w_up, w_down and weights (N, K)."""
    grad_out = grad_out.contiguous()
    return grouped_backward(grad_out, x, w_up, w_down, weights, order, offsets, h, silu, activation, kernel)


@experts_backward.register_fake
def _experts_backward_fake(
    grad_out: Tensor,
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    weights: Tensor,
    order: Tensor,
    offsets: Tensor,
    h: Tensor,
    silu: Tensor,
    activation: str,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down), torch.empty_like(weights)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    x, w_up, w_down, _, weights, activation, kernel = inputs
    _, order, offsets, h, silu = output
    ctx.save_for_backward(x, w_up, w_down, weights, order, offsets, h, silu)
    ctx.meta = (activation, kernel)


def _backward(ctx, grad_out: Tensor, *unused: Tensor) -> tuple:  # noqa: ANN001
    grads = torch.ops.moeformer.experts_backward(grad_out, *ctx.saved_tensors, *ctx.meta)
    grad_x, grad_w_up, grad_w_down, grad_weights = grads
    return grad_x, grad_w_up, grad_w_down, None, grad_weights, None, None


experts_forward.register_autograd(_backward, setup_context=_setup_context)


class _GroupedExperts(torch.autograd.Function):
    """The same node without the custom-op dispatch, for eager calls (about 0.5 ms less per layer's
    forward and backward on small inputs); the counts list goes to backward as well."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, w_up: Tensor, w_down: Tensor, index: Tensor, weights: Tensor, activation: str, kernel: str
    ) -> Tensor:
        (out, order, offsets, h, silu), counts = grouped_forward(x, w_up, w_down, index, weights, activation, kernel)
        ctx.save_for_backward(x, w_up, w_down, weights, order, offsets, h, silu)
        ctx.meta = (activation, kernel, counts)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple:  # type: ignore[override]
        grads = grouped_backward(grad_out, *ctx.saved_tensors, *ctx.meta)
        grad_x, grad_w_up, grad_w_down, grad_weights = grads
        return grad_x, grad_w_up, grad_w_down, None, grad_weights, None, None


def grouped_experts(
    x: Tensor, w_up: Tensor, w_down: Tensor, index: Tensor, weights: Tensor, activation: str, kernel: str
) -> Tensor:
    """x (N, D), index and weights (N, K) -> (N, D); kernel "grouped_mm", "loop" or "auto".

    Under ``torch.compile`` the custom op (dynamo needs ``capture_dynamic_output_shape_ops``
    for its data-dependent row count: :func:`moeformer.compiled.dynamo_settings`); in eager
    mode the equivalent autograd function.
    """
    if torch.compiler.is_compiling():
        return torch.ops.moeformer.experts_forward(x, w_up, w_down, index, weights, activation, kernel)[0]
    return _GroupedExperts.apply(x, w_up, w_down, index, weights, activation, kernel)
