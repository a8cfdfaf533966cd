"""Grouped expert computation: gather -> expert MLPs -> weighted scatter, forward and backward.

Shapes: N tokens, D model width, H expert hidden, E experts, K experts per token, V routed
(token, expert) rows sorted by expert, so the rows of expert e form one contiguous slice of
``counts[e]`` rows (dropped assignments, expert id E, sort last and are cut off).

Forward, for every row r (token t, expert e, gate weight w):
    h_r = x_t W_up[e]^T            (2H for SwiGLU: gate then up)
    a_r = act(h_r) * w             (the gate weight scales the H-wide hidden, not the D-wide output)
    out_t += a_r W_down[e]^T

The backward is written by hand (rather than letting autograd record each step): only h (and
SiLU of its gate half) and the routing are kept between the passes; the gathered inputs are
gathered again in backward, which cuts the activation memory well below autograd's own graph.
:mod:`moeformer.moe.expert_ops` makes the pair one autograd node and one opaque op for
``torch.compile``. Three grouped products serve forward and backward:

    gmm(a, W)        rows of expert e times W[e]^T      (V, in) -> (V, out)
    gmm_t(g, W)      rows of expert e times W[e]        (V, out) -> (V, in)
    gmm_wgrad(a, g)  per expert g_e^T a_e               -> (E, out, in)

each with a ``grouped_mm`` kernel (``torch.nn.functional.grouped_mm``) and a ``loop`` kernel
(one matmul per expert into a shared buffer); ``auto`` picks one per call (:func:`resolve_kernel`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

Kernel = Literal["grouped_mm", "loop"]


def resolve_kernel(x: Tensor, w: Tensor, kernel: str) -> str:
    """``kernel`` itself, or for "auto": ``grouped_mm`` where torch has a kernel for the device,
    dtype and shapes (CPU: any float dtype; CUDA: bf16 on compute capability >= 8.0; rows of a
    multiple of 16 bytes, aligned storage), else ``loop``. Needs real tensors (data pointers)."""
    if kernel != "auto":
        return kernel
    if not hasattr(F, "grouped_mm"):
        return "loop"
    size = x.element_size()
    if any((n * size) % 16 for n in w.shape[1:]) or x.data_ptr() % 16 or w.data_ptr() % 16:
        return "loop"
    if x.is_cuda:
        ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
        return "grouped_mm" if ok else "loop"
    return "grouped_mm" if x.device.type == "cpu" else "loop"


def sort_assignments(index: Tensor, n_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """index (N, K) expert ids (n_experts = dropped) -> (order (V,) flat positions grouped by
    expert, counts (E,) int64, the same counts as a list). One host sync: the counts' ``tolist``."""
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, dropped last
    counts_t = torch.bincount(flat, minlength=n_experts + 1)[:n_experts]
    counts = counts_t.tolist()
    return order[: sum(counts)], counts_t, counts


def combine(y: Tensor, order: Tensor, n_tokens: int, k: int) -> Tensor:
    """Sum each token's rows: y (V, D) sorted by expert -> (N, D), out[t] = sum of the rows of t.

    A gather by the inverse permutation and a sum over the k slots, instead of ``index_add_``
    into a zeroed buffer: no atomics on a GPU (bf16 ``index_add_`` took 1.7 ms of a 12 ms
    step at DeepSeek-V2-Lite's shape on an H200) and a parallel gather on a CPU. Dropped slots
    (fewer rows than N * k) read an appended zero row.
    """
    V, D = y.shape
    if V < n_tokens * k:
        y = torch.cat([y, y.new_zeros(1, D)])
    slot = torch.full((n_tokens * k,), V, dtype=torch.long, device=y.device)
    slot[order] = torch.arange(V, device=y.device)
    return y.index_select(0, slot).view(n_tokens, k, D).sum(1, dtype=y.dtype)  # autocast: keep y's dtype


def _slices(counts: list[int]) -> list[tuple[int, slice]]:
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, slice(start, start + n)))
        start += n
    return out


def gmm(a: Tensor, w: Tensor, counts: list[int], offsets: Tensor, kernel: str) -> Tensor:
    """(V, in) x W (E, out, in) -> (V, out): each expert's rows times W[e]^T."""
    if kernel == "grouped_mm":
        return F.grouped_mm(a, w.transpose(-2, -1), offs=offsets)
    out = a.new_empty(a.shape[0], w.shape[1])
    for e, rows in _slices(counts):
        torch.mm(a[rows], w[e].t(), out=out[rows])
    return out


def gmm_t(g: Tensor, w: Tensor, counts: list[int], offsets: Tensor, kernel: str) -> Tensor:
    """(V, out) x W (E, out, in) -> (V, in): each expert's rows times W[e]."""
    if kernel == "grouped_mm":
        return F.grouped_mm(g, w, offs=offsets)
    out = g.new_empty(g.shape[0], w.shape[2])
    for e, rows in _slices(counts):
        torch.mm(g[rows], w[e], out=out[rows])
    return out


def gmm_wgrad(a: Tensor, g: Tensor, n_experts: int, counts: list[int], offsets: Tensor, kernel: str) -> Tensor:
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


def grouped_forward(
    x: Tensor, w_up: Tensor, w_down: Tensor, index: Tensor, weights: Tensor, activation: str, kernel: str
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor], list[int]]:
    """out (N, D) = sum over each token's rows of act(x W_up[e]^T) * w W_down[e]^T.

    x: (N, D); w_up: (E, 2H or H, D); w_down: (E, D, H); index, weights: (N, K).
    Returns (out, then what backward needs: order (V,) int64, offsets (E,) int32 (cumulative
    counts), h (V, 2H or H), SiLU of h's gate half (V, H) for SwiGLU, else an empty tensor),
    and the per-expert counts as a list (the loop kernel's slices).

    Runs with autocast off: the caller has cast x and the weights to the autocast dtype, and
    autocast would recast some steps (CUDA's runs ``sum`` in float32, which made the output and
    the products after it float32: caught by tests/test_device.py on an H200).
    """
    with torch.autocast(x.device.type, enabled=False):
        return _grouped_forward(x, w_up, w_down, index, weights, activation, kernel)


def _grouped_forward(
    x: Tensor, w_up: Tensor, w_down: Tensor, index: Tensor, weights: Tensor, activation: str, kernel: str
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor], list[int]]:
    K, E = index.shape[1], w_up.shape[0]
    kernel = resolve_kernel(x, w_down, kernel)
    order, counts_t, counts = sort_assignments(index, E)
    token = order // K
    gate = weights.reshape(-1)[order, None].to(x.dtype)
    offsets = counts_t.cumsum(0).to(torch.int32)
    h = gmm(x.index_select(0, token), w_up, counts, offsets, kernel)
    if activation == "swiglu":
        silu = F.silu(h[:, : h.shape[1] // 2])
        a = silu * h[:, h.shape[1] // 2 :]
    else:
        silu = h.new_empty(0)
        a = activate(h, activation)
    y = gmm(a.mul_(gate), w_down, counts, offsets, kernel)
    out = combine(y, order, x.shape[0], K)
    return (out, order, offsets, h, silu), counts


def grouped_backward(
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
    counts: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, w_up, w_down, weights) from the upstream (N, D) and :func:`grouped_forward`'s
    saved tensors; the gathered inputs and the activation are recomputed, not stored.
    ``counts``: the forward's list, else read from ``offsets`` where the loop kernel needs it."""
    K, E = weights.shape[1], w_up.shape[0]
    kernel = resolve_kernel(x, w_down, kernel)
    if counts is None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist() if kernel == "loop" else []
    token = order // K
    gate = weights.reshape(-1)[order, None].to(x.dtype)
    grad_y = grad_out.index_select(0, token)  # (V, D)
    if activation == "swiglu":
        g, u = h.chunk(2, dim=-1)
        act = silu * u
    else:
        act = activate(h, activation)
    grad_w_down = gmm_wgrad(act * gate, grad_y, E, counts, offsets, kernel)
    grad_a = gmm_t(grad_y, w_down, counts, offsets, kernel)  # (V, H)
    grad_gate = (grad_a * act).sum(-1)
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
    grad_x = combine(gmm_t(grad_h, w_up, counts, offsets, kernel), order, x.shape[0], K)
    grad_weights = torch.zeros(weights.numel(), dtype=weights.dtype, device=weights.device)
    grad_weights.index_copy_(0, order, grad_gate.to(weights.dtype))  # each flat position once
    return grad_x, grad_w_up, grad_w_down, grad_weights.view_as(weights)
