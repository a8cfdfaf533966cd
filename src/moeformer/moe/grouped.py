"""Grouped expert computation: one autograd node for gather -> expert MLPs -> weighted scatter.

Shapes: N tokens, D model width, H expert hidden, E experts, V routed (token, expert) rows
sorted by expert, so the rows of expert e form one contiguous slice of ``counts[e]`` rows.

Forward, for every row r (token t, expert e, gate weight w):
    h_r = x_t W_up[e]^T            (2H for SwiGLU: gate then up)
    a_r = act(h_r) * w             (the gate weight scales the H-wide hidden, not the D-wide output)
    out_t += a_r W_down[e]^T

Writing the backward by hand (rather than letting autograd record each step) saves only h (and
SiLU of its gate half) and the routing: the gathered inputs are gathered again in backward, which
cuts the activation memory well below autograd's own graph, and no per-expert nodes exist.
Three grouped products serve forward and backward:

    gmm(a, W)        rows of expert e times W[e]^T      (V, in) -> (V, out)
    gmm_t(g, W)      rows of expert e times W[e]        (V, out) -> (V, in)
    gmm_wgrad(a, g)  per expert g_e^T a_e               -> (E, out, in)

each with a ``grouped_mm`` kernel (``torch.nn.functional.grouped_mm``) and a ``loop`` kernel
(one matmul per expert into a shared buffer).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

Kernel = Literal["grouped_mm", "loop"]


def _slices(counts: list[int]) -> list[tuple[int, slice]]:
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, slice(start, start + n)))
        start += n
    return out


def gmm(a: Tensor, w: Tensor, counts: list[int], offsets: Tensor, kernel: Kernel) -> Tensor:
    """(V, in) x W (E, out, in) -> (V, out): each expert's rows times W[e]^T."""
    if kernel == "grouped_mm":
        return F.grouped_mm(a, w.transpose(-2, -1), offs=offsets)
    out = a.new_empty(a.shape[0], w.shape[1])
    for e, rows in _slices(counts):
        torch.mm(a[rows], w[e].t(), out=out[rows])
    return out


def gmm_t(g: Tensor, w: Tensor, counts: list[int], offsets: Tensor, kernel: Kernel) -> Tensor:
    """(V, out) x W (E, out, in) -> (V, in): each expert's rows times W[e]."""
    if kernel == "grouped_mm":
        return F.grouped_mm(g, w, offs=offsets)
    out = g.new_empty(g.shape[0], w.shape[2])
    for e, rows in _slices(counts):
        torch.mm(g[rows], w[e], out=out[rows])
    return out


def gmm_wgrad(a: Tensor, g: Tensor, n_experts: int, counts: list[int], offsets: Tensor, kernel: Kernel) -> Tensor:
    """Per expert g_e^T a_e: (V, in), (V, out) -> (E, out, in); zero for experts without rows."""
    if kernel == "grouped_mm":
        return F.grouped_mm(g.t(), a, offs=offsets)
    out = a.new_empty(n_experts, g.shape[1], a.shape[1])
    for e, n in enumerate(counts):
        if not n:
            out[e].zero_()
    for e, rows in _slices(counts):
        torch.mm(g[rows].t(), a[rows], out=out[e])
    return out


def activate(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h) if activation == "gelu" else F.relu(h)


class GroupedExperts(torch.autograd.Function):
    """out (N, D) = sum over each token's rows of act(x W_up[e]^T) * w W_down[e]^T.

    Saved for backward: h (V, 2H or H) and, for SwiGLU, SiLU(gate half) (V, H), plus the routing.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        w_up: Tensor,
        w_down: Tensor,
        gate: Tensor,
        token: Tensor,
        counts: list[int],
        offsets: Tensor,
        activation: str,
        kernel: Kernel,
    ) -> Tensor:
        xs = x.index_select(0, token)
        h = gmm(xs, w_up, counts, offsets, kernel)
        if activation == "swiglu":
            silu = F.silu(h[:, : h.shape[1] // 2])
            a = silu * h[:, h.shape[1] // 2 :]
        else:
            silu = h.new_empty(0)
            a = activate(h, activation)
        y = gmm(a.mul_(gate), w_down, counts, offsets, kernel)
        ctx.save_for_backward(x, w_up, w_down, gate, token, offsets, h, silu)
        ctx.meta = (counts, activation, kernel)
        return torch.zeros_like(x).index_add_(0, token, y)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, w_up, w_down, gate, token, offsets, h, silu = ctx.saved_tensors
        counts, activation, kernel = ctx.meta
        E = w_up.shape[0]
        grad_y = grad_out.index_select(0, token)  # (V, D)
        if activation == "swiglu":
            g, u = h.chunk(2, dim=-1)
            act = silu * u
        else:
            act = activate(h, activation)
        grad_w_down = gmm_wgrad(act * gate, grad_y, E, counts, offsets, kernel)
        grad_a = gmm_t(grad_y, w_down, counts, offsets, kernel)  # (V, H)
        grad_gate = (grad_a * act).sum(-1, keepdim=True)
        grad_a.mul_(gate)
        if activation == "swiglu":
            grad_h = torch.empty_like(h)
            grad_g, grad_u = grad_h.chunk(2, dim=-1)
            torch.mul(grad_a, silu, out=grad_u)
            grad_g.copy_(torch.ops.aten.silu_backward(grad_a.mul_(u), g))
        elif activation == "gelu":
            grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        else:
            grad_h = grad_a.mul_(h > 0)
        xs = x.index_select(0, token)  # recomputed gather: not stored between the passes
        grad_w_up = gmm_wgrad(xs, grad_h, E, counts, offsets, kernel)
        grad_x = torch.zeros_like(x).index_add_(0, token, gmm_t(grad_h, w_up, counts, offsets, kernel))
        return grad_x, grad_w_up, grad_w_down, grad_gate, None, None, None, None, None
