"""The experts: E feed-forward networks with stacked weights, and how tokens reach them.

Shapes: N tokens, D model width, H expert hidden size, E experts, K experts per token,
A = N * K (token, expert) assignments, of which V survive capacity dropping.

Weights are stacked like ``nn.Linear``'s (out, in) and like transformers 5 MoE checkpoints:
``gate_up_proj`` (E, 2H, D) gate rows then up rows (SwiGLU), or ``up_proj`` (E, H, D) (ReLU/GELU);
``down_proj`` (E, D, H); optional biases ``up_bias`` (E, 2H or H), ``down_bias`` (E, D).

Fast dispatch (:meth:`Experts.forward`): flatten the assignments, stable-sort them by expert,
count with ``bincount``, gather the tokens into one contiguous (V, D) block, run each projection
as one grouped matrix product over the per-expert slices, scale by the gate weights and
``index_add_`` back. Kernels for the grouped product, chosen by ``backend``:

- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` (one kernel for all experts);
- ``loop``: one matmul per expert slice (cheap Python loop over E);
- ``bmm``: slices padded to the largest count, one batched matmul;
- ``auto``: ``grouped_mm`` where torch has a kernel for the device, dtype and shapes (CPU: any
  float dtype; CUDA: bf16 on compute capability >= 8.0; widths a multiple of 16 bytes), else
  ``loop`` (see BENCHMARKS.md).

:meth:`Experts.forward_reference` is the readable loop over experts with boolean selection,
kept as the reference the fast path is tested against.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Backend = Literal["auto", "grouped_mm", "loop", "bmm"]


class Experts(nn.Module):
    def __init__(
        self,
        n_experts: int,
        d_model: int,
        hidden: int,
        *,
        activation: Literal["relu", "gelu", "swiglu"] = "swiglu",
        bias: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.n_experts, self.d_model, self.hidden = n_experts, d_model, hidden
        self.activation, self.backend = activation, backend
        first = 2 * hidden if activation == "swiglu" else hidden
        name = "gate_up_proj" if activation == "swiglu" else "up_proj"
        self.first_name = name
        setattr(self, name, nn.Parameter(torch.empty(n_experts, first, d_model)))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.up_bias = nn.Parameter(torch.zeros(n_experts, first)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        # Xavier-uniform per expert, as the dense layers of the models.
        for w in (self.first_weight, self.down_proj):
            bound = (6.0 / (w.shape[1] + w.shape[2])) ** 0.5
            nn.init.uniform_(w, -bound, bound)

    @property
    def first_weight(self) -> Tensor:
        return getattr(self, self.first_name)

    def activate(self, h: Tensor) -> Tensor:
        """(..., 2H or H) -> (..., H)."""
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h) if self.activation == "gelu" else F.relu(h)

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """x: (N, D); index: (N, K) expert ids (E = dropped); weights: (N, K) -> (N, D)."""
        N, K = index.shape
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, dropped last
        counts = torch.bincount(flat, minlength=self.n_experts + 1)[: self.n_experts]
        valid = int(counts.sum())  # one host sync: the size of everything below
        order = order[:valid]
        token = order // K
        expert_of_row = flat[order]
        xs = x.index_select(0, token)  # (V, D), rows of one expert contiguous; backward: index_add
        h = self._grouped_linear(xs, self.first_weight, counts)
        if self.up_bias is not None:
            h = h + self.up_bias[expert_of_row]
        gate = weights.reshape(-1)[order, None].to(h.dtype)
        if self.down_bias is None and self.activation == "swiglu":
            # fused SiLU(g) * u * gate: scales the (V, H) hidden, not the (V, D) output
            y = self._grouped_linear(_ScaledSwiGLU.apply(h, gate), self.down_proj, counts)
        elif self.down_bias is None:
            y = self._grouped_linear(self.activate(h) * gate, self.down_proj, counts)
        else:
            y = (self._grouped_linear(self.activate(h), self.down_proj, counts) + self.down_bias[expert_of_row]) * gate
        return torch.zeros_like(x).index_add_(0, token, y)

    def _grouped_linear(self, xs: Tensor, w: Tensor, counts: Tensor) -> Tensor:
        """Rows of expert e (a contiguous slice) times w[e]^T: (V, in) -> (V, out)."""
        backend = _auto_backend(xs, w) if self.backend == "auto" else self.backend
        if backend == "grouped_mm":
            offsets = counts.cumsum(0).to(torch.int32)
            return F.grouped_mm(xs.to(w.dtype), w.transpose(-2, -1), offs=offsets)
        sizes = counts.tolist()
        if backend == "bmm":
            return _padded_bmm(xs, w, counts, sizes)
        return _LoopGroupedLinear.apply(xs, w, sizes)

    def forward_reference(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """The readable version: for each expert, find its tokens, run it, add weighted output."""
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            h = x[token] @ self.first_weight[e].t()
            if self.up_bias is not None:
                h = h + self.up_bias[e]
            y = self.activate(h) @ self.down_proj[e].t()
            if self.down_bias is not None:
                y = y + self.down_bias[e]
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out


def _auto_backend(xs: Tensor, w: Tensor) -> str:
    if not hasattr(F, "grouped_mm"):
        return "loop"
    # the kernel needs 16-byte aligned rows: widths a multiple of 16 bytes, aligned storage
    size = xs.element_size()
    if any((n * size) % 16 for n in w.shape[1:]) or xs.data_ptr() % 16 or w.data_ptr() % 16:
        return "loop"
    if xs.is_cuda:
        ok = xs.dtype == torch.bfloat16 and torch.cuda.get_device_capability(xs.device) >= (8, 0)
        return "grouped_mm" if ok else "loop"
    return "grouped_mm" if xs.device.type == "cpu" else "loop"


def _padded_bmm(xs: Tensor, w: Tensor, counts: Tensor, sizes: list[int]) -> Tensor:
    """Pad each expert's rows to the largest count, one bmm, then drop the padding rows."""
    E, width = len(sizes), max(sizes) if sizes else 0
    starts = counts.cumsum(0) - counts
    expert = torch.repeat_interleave(torch.arange(E, device=xs.device), counts)
    slot = torch.arange(xs.shape[0], device=xs.device) - starts[expert]
    padded = xs.new_zeros(E, width, xs.shape[1])
    padded[expert, slot] = xs
    out = torch.bmm(padded, w.transpose(-2, -1).to(xs.dtype))  # (E, width, out)
    return out[expert, slot]


class _LoopGroupedLinear(torch.autograd.Function):
    """Per-expert matmuls writing into one preallocated output (no cat in forward, no stack of
    per-expert weight gradients in backward, one autograd node instead of one per expert)."""

    @staticmethod
    def forward(ctx, xs: Tensor, w: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(xs, w)
        ctx.sizes = sizes
        out = xs.new_empty(xs.shape[0], w.shape[1])
        start = 0
        for e, n in enumerate(sizes):
            if n:
                torch.mm(xs[start : start + n], w[e].t(), out=out[start : start + n])
            start += n
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        xs, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = xs.new_empty(xs.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            if not n and grad_w is not None:
                grad_w[e].zero_()  # an expert without tokens gets a zero gradient
            if n:
                g = grad[start : start + n]
                if grad_x is not None:
                    torch.mm(g, w[e], out=grad_x[start : start + n])
                if grad_w is not None:
                    torch.mm(g.t(), xs[start : start + n], out=grad_w[e])
            start += n
        return grad_x, grad_w, None


class _ScaledSwiGLU(torch.autograd.Function):
    """SiLU(g) * u * w for h = [g | u] (V, 2H) and w (V, 1), saving only h and w.

    Autograd through chunk / silu / mul would keep three (V, H) tensors and concatenate the two
    gradient halves; here the gradient of h is written in place into one (V, 2H) buffer.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, w)
        g, u = h.chunk(2, dim=-1)
        return F.silu(g).mul_(u).mul_(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        h, w = ctx.saved_tensors
        g, u = h.chunk(2, dim=-1)
        silu = F.silu(g)
        grad_w = (grad * silu).mul_(u).sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        gw = grad * w
        grad_h = torch.empty_like(h)
        grad_g, grad_u = grad_h.chunk(2, dim=-1)
        torch.mul(gw, silu, out=grad_u)
        grad_g.copy_(torch.ops.aten.silu_backward(gw.mul_(u), g))  # one fused kernel for d silu
        return grad_h, grad_w
