"""The experts: E feed-forward networks with stacked weights, and how tokens reach them.

Shapes: N tokens, D model width, H expert hidden size, E experts, K experts per token,
A = N * K (token, expert) assignments, of which V survive capacity dropping.

Weights are stacked like ``nn.Linear``'s (out, in) and like transformers 5 MoE checkpoints:
``gate_up_proj`` (E, 2H, D) gate rows then up rows (SwiGLU), or ``up_proj`` (E, H, D) (ReLU/GELU);
``down_proj`` (E, D, H); optional biases ``up_bias`` (E, 2H or H), ``down_bias`` (E, D).

Fast dispatch (:meth:`Experts.forward`): flatten the assignments, stable-sort them by expert,
count with ``bincount``, gather the tokens into one contiguous (V, D) block, run each projection
as one grouped matrix product over the per-expert slices, scale by the gate weights and
``index_add_`` back (:mod:`moeformer.moe.grouped`: one autograd node with a hand-written backward
that recomputes the gather and the activation instead of storing them, registered as custom ops
in :mod:`moeformer.moe.expert_ops` so that ``torch.compile`` traces around it without a break).
Kernels for the grouped product, chosen by ``backend``:

- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` (one kernel for all experts);
- ``loop``: one matmul per expert slice, written into a shared buffer;
- ``bmm``: slices padded to the largest count, one batched matmul (under plain autograd, as are
  experts with biases);
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

from moeformer.moe.expert_ops import grouped_experts
from moeformer.moe.grouped import activate, resolve_kernel, sort_assignments

Backend = Literal["auto", "grouped_mm", "loop", "bmm"]


# torch.compiler.disable, lazily: the public decorator imports torch._dynamo when applied, 1.3 s
# of every CLI command's start; torch's own lazy form (private, hence the fallback) imports it at
# the first call.
_eager_only = getattr(torch, "_disable_dynamo", torch.compiler.disable)


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
        return activate(h, self.activation)

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """x: (N, D); index: (N, K) expert ids (E = dropped); weights: (N, K) -> (N, D)."""
        w_first, w_down = self.first_weight, self.down_proj
        if torch.is_autocast_enabled(x.device.type):
            # grouped_mm and mm(out=) are outside autocast's op lists: cast here, as autocast would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_first, w_down = x.to(dtype), w_first.to(dtype), w_down.to(dtype)
        if self.backend != "bmm" and self.up_bias is None:  # one custom op: compiles without a graph break
            return grouped_experts(x, w_first, w_down, index, weights, self.activation, self.backend)
        return self._composed(x, w_down, index, weights)

    # Reads counts and data pointers on the host: under torch.compile a graph break, run eagerly.
    @_eager_only
    def _composed(self, x: Tensor, w_down: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """The same computation step by step under autograd: for biases and the padded-bmm kernel."""
        order, counts, _ = sort_assignments(index, self.n_experts)
        token, expert_of_row = order // index.shape[1], index.reshape(-1)[order]
        gate = weights.reshape(-1)[order, None].to(x.dtype)
        backend = resolve_kernel(x, w_down, self.backend)
        xs = x.index_select(0, token)
        h = self._grouped_linear(xs, self.first_weight, counts, backend)
        if self.up_bias is not None:
            h = h + self.up_bias[expert_of_row]
        y = self._grouped_linear(self.activate(h) * gate, self.down_proj, counts, backend)
        if self.down_bias is not None:
            y = y + self.down_bias[expert_of_row] * gate
        return torch.zeros_like(x).index_add_(0, token, y)

    def _grouped_linear(self, xs: Tensor, w: Tensor, counts: Tensor, backend: str) -> Tensor:
        """Rows of expert e (a contiguous slice) times w[e]^T: (V, in) -> (V, out), under autograd."""
        w = w.to(xs.dtype)  # under autocast the rows arrive in the autocast dtype
        if backend == "grouped_mm":
            return F.grouped_mm(xs, w.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
        sizes = counts.tolist()
        if backend == "bmm":
            return _padded_bmm(xs, w, counts, sizes)
        ws = w.unbind(0)  # unbind, not w[e]: indexing would build a full-size gradient per expert
        parts = [xe @ ws[e].t() for e, xe in enumerate(xs.split(sizes)) if sizes[e]]
        return torch.cat(parts) if parts else xs.new_zeros(0, w.shape[1])

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
