"""The experts: E feed-forward networks with stacked weights, and how tokens reach them.

Shapes: N tokens, D model width, H expert hidden size, E experts, K experts per token,
A = N * K (token, expert) assignments, of which V survive capacity dropping.

Weights are stacked like ``nn.Linear``'s (out, in) and like transformers 5 MoE checkpoints:
``gate_up_proj`` (E, 2H, D) gate rows then up rows (SwiGLU), or ``up_proj`` (E, H, D) (ReLU/GELU);
``down_proj`` (E, D, H); optional biases ``up_bias`` (E, 2H or H), ``down_bias`` (E, D).

Fast dispatch (:meth:`Experts.forward`): flatten the assignments, stable-sort them by expert,
count with ``bincount``, gather the tokens into one contiguous (V, D) block, run each projection
as one grouped matrix product over the per-expert slices, scale by the gate weights and
``index_add_`` back (:class:`~moeformer.moe.grouped.GroupedExperts`, one autograd node with a
hand-written backward that recomputes the gather and the activation instead of storing them).
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

from moeformer.moe.grouped import GroupedExperts, activate

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
        return activate(h, self.activation)

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """x: (N, D); index: (N, K) expert ids (E = dropped); weights: (N, K) -> (N, D)."""
        N, K = index.shape
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, dropped last
        counts_t = torch.bincount(flat, minlength=self.n_experts + 1)[: self.n_experts]
        counts = counts_t.tolist()  # one host sync: the sizes of everything below
        order = order[: sum(counts)]
        token = order // K
        gate = weights.reshape(-1)[order, None].to(x.dtype)
        offsets = counts_t.cumsum(0).to(torch.int32)
        w_first, w_down = self.first_weight, self.down_proj
        if torch.is_autocast_enabled(x.device.type):
            # grouped_mm and mm(out=) are outside autocast's op lists: cast here, as autocast would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_first, w_down, gate = x.to(dtype), w_first.to(dtype), w_down.to(dtype), gate.to(dtype)
        backend = _auto_backend(x, w_down) if self.backend == "auto" else self.backend
        if backend != "bmm" and self.up_bias is None:
            return GroupedExperts.apply(x, w_first, w_down, gate, token, counts, offsets, self.activation, backend)
        return self._composed(x, token, gate, flat[order], counts_t, backend)

    def _composed(
        self, x: Tensor, token: Tensor, gate: Tensor, expert_of_row: Tensor, counts: Tensor, backend: str
    ) -> Tensor:
        """The same computation step by step under autograd: for biases and the padded-bmm kernel."""
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
