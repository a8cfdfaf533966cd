"""Weights prepared for decoding: each matrix product in the layout its small batch runs fastest in.

A decoding step multiplies a handful of rows (the batch) by every weight of the model, so it is
bound by how fast the BLAS streams the weights, and on a CPU that depends on the layout far more
than at training sizes. Measured on this project's 2-core AMD EPYC (Zen 4) with MKL 2024.2,
float32, one thread, weights cold (BENCHMARKS.md, "Greedy decoding vs transformers generate"):

- one row times a (1024, 384) weight: ``F.linear`` 202 us, the same product on the transposed
  copy (``x @ W^T`` with ``W^T`` contiguous) 102 us; the (8192, 384) output head 1,310 vs 576 us;
- eight rows: ``F.linear`` 253 us, oneDNN's linear on a weight reordered for eight rows
  (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does for bf16) 125 us;
  the head 2,108 vs 881 us;
- while for a (384, 1024) weight plain ``F.linear`` stays the fastest at one row.

So no layout wins everywhere, and the winner changes with the CPU. :func:`prepare_for_decoding`
measures, once per weight shape, each candidate kernel on the model's own weights at the batch
size that will decode, and keeps the fastest (as ``torch.backends.cudnn.benchmark`` does for
convolutions). Kernels (:data:`KERNELS`):

- ``linear``: ``F.linear`` on the weight as it is;
- ``transposed``: ``x @ W^T`` on a contiguous transposed copy;
- ``onednn``: oneDNN's linear on a weight reordered for the batch (CPU builds with mkldnn).

The routed experts are timed too (:data:`EXPERT_KERNELS`): ``grouped``, as they are; ``dense``,
every expert's product for every token as two ordinary products over the stacked weights, the
gates zero for experts a token did not choose (:class:`DenseExperts`): E/K times the arithmetic,
but at batch 8 with 7 of 31 experts per token nearly every expert is used anyway, and two large
products stream the weights at twice the rate of 60 per-expert ones (6 layers: 10 vs 19 ms per
step on the CPU above); ``chosen``, only the experts each token chose, a product pair each
(:class:`ChosenExperts`: at batch 1, 3.8 vs 5.3 ms, since CPU ``grouped_mm`` runs a product for
every expert, empty groups included).

The prepared model is a copy sharing every parameter with the original; the prepared weights are
snapshots: prepare again after the weights change. Results equal the original's within float
rounding (the kernels sum in other orders), not bitwise; that is also why greedy tokens can, in
principle, differ where two logits tie within rounding.

Shapes: B batch (rows per decoding step), N rows, D model width, E experts, H expert hidden.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moeformer.models.decoder import DecoderLM
from moeformer.moe.experts import Experts
from moeformer.moe.grouped import activate

KERNELS = ("linear", "transposed", "onednn")
EXPERT_KERNELS = ("grouped", "dense", "chosen")


@torch.library.custom_op("moeformer::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x: (N, in), packed: oneDNN's reordered (out, in) weight -> (N, out). A custom op: compiled
    graphs call it as it is (inductor lowers oneDNN's linear only for weights it froze itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_fake(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


def available_kernels(weight: Tensor) -> tuple[str, ...]:
    """The kernels of :data:`KERNELS` that can run ``weight``'s products on its device and dtype."""
    onednn = (
        weight.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and weight.dtype in (torch.float32, torch.bfloat16)
    )
    return KERNELS if onednn else KERNELS[:2]


class PreparedLinear(nn.Module):
    """``nn.Linear``'s product with its weight in the layout of ``kernel``: (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear, kernel: str, batch: int) -> None:
        super().__init__()
        if kernel not in available_kernels(linear.weight):
            raise ValueError(f"kernel {kernel!r} cannot run here; allowed: {available_kernels(linear.weight)}")
        self.kernel, self.in_features, self.out_features = kernel, linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # ``weight`` stays the (out, in) original: code that reads it directly (MLA's absorbed
        # projections) sees what it expects; the products use ``prepared``
        self.register_buffer("weight", weight, persistent=False)
        if kernel == "transposed":
            weight = weight.t().contiguous()
        elif kernel == "onednn":
            weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)
        self.register_buffer("prepared", weight, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        rows, w = x.reshape(-1, self.in_features), self.prepared
        if self.kernel == "linear":
            y = F.linear(rows, w, self.bias)
        elif self.kernel == "transposed":
            y = rows @ w if self.bias is None else torch.addmm(self.bias, rows, w)
        else:
            y = onednn_linear(rows.contiguous(), w, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel={self.kernel}"


class DenseExperts(nn.Module):
    """Every routed expert for every token, in two products over the stacked weights.

    y = sum_e g_e * down_e(act(up_e(x))) with g_e = 0 for the experts a token did not choose
      = [g_1 act(up_1 x), ..., g_E act(up_E x)] @ [down_1, ..., down_E]^T
    (gates applied before the down projection, as the grouped path does). Same interface as
    :class:`~moeformer.moe.experts.Experts`: x (N, D), index (N, K) with E = dropped, weights
    (N, K) -> (N, D). More than ``batch`` rows (the prompt's pass) go to the grouped experts:
    there the E/K times larger arithmetic would cost more than the weights' reads save.
    """

    def __init__(self, experts: Experts, up: PreparedLinear, down: PreparedLinear, batch: int) -> None:
        super().__init__()
        self.n_experts, self.hidden, self.activation = experts.n_experts, experts.hidden, experts.activation
        self.up, self.down, self.grouped, self.batch = up, down, experts, batch

    @staticmethod
    def stacked(experts: Experts) -> tuple[nn.Linear, nn.Linear]:
        """The experts' weights as two linears: up (E*2H or E*H, D), down (D, E*H)."""
        E, D, H = experts.n_experts, experts.d_model, experts.hidden
        # on the meta device: no weights allocated and initialised only to be replaced
        up = nn.Linear(D, experts.first_weight.shape[1] * E, bias=False, device="meta")
        down = nn.Linear(E * H, D, bias=False, device="meta")
        up.weight = nn.Parameter(experts.first_weight.detach().reshape(-1, D), requires_grad=False)  # a view
        down.weight = nn.Parameter(experts.down_proj.detach().permute(1, 0, 2).reshape(D, E * H), requires_grad=False)
        return up, down

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        N, E = x.shape[0], self.n_experts
        if N > self.batch:
            return self.grouped(x, index, weights)
        gates = x.new_zeros(N, E + 1).scatter_add_(1, index, weights.to(x.dtype))[:, :E]  # column E: dropped
        h = activate(self.up(x).view(N, E, -1), self.activation)  # (N, E, H)
        return self.down((h * gates[:, :, None]).reshape(N, E * self.hidden))

    def extra_repr(self) -> str:
        return f"{self.n_experts} experts of {self.hidden}, all run, unchosen ones gated to 0"


@torch.library.custom_op("moeformer::chosen_experts", mutates_args=())
def chosen_experts(x: Tensor, up_t: Tensor, down_t: Tensor, index: Tensor, weights: Tensor, activation: str) -> Tensor:
    """x (N, D), up_t (E, D, 2H or H), down_t (E, H, D) -> (N, D): one product pair per (token,
    expert) chosen. Reads the routing on the host, hence a custom op (a compiled graph calls it)."""
    out = torch.zeros_like(x)
    E, H = up_t.shape[0], down_t.shape[1]
    for n, (experts, gates) in enumerate(zip(index.tolist(), weights.tolist())):
        row, acc = x[n : n + 1], out[n : n + 1]
        for e, g in zip(experts, gates):
            if e >= E:  # dropped by capacity
                continue
            h = torch.mm(row, up_t[e])
            a = F.silu(h[:, :H]).mul_(h[:, H:]) if activation == "swiglu" else activate(h, activation)
            acc.addmm_(a, down_t[e], alpha=g)  # the product and the gated sum in one call
    return out


@chosen_experts.register_fake
def _chosen_experts_fake(
    x: Tensor, up_t: Tensor, down_t: Tensor, index: Tensor, weights: Tensor, activation: str
) -> Tensor:
    return torch.empty_like(x)


class ChosenExperts(nn.Module):
    """Only the chosen experts, token by token, on transposed copies of their weights.

    For one or two tokens per step: the grouped path's kernel visits every expert (CPU
    ``grouped_mm`` runs a product per group, empty ones included: 31 x 2 per layer at batch 1),
    while K experts per token are all the work there is. Same interface as
    :class:`~moeformer.moe.experts.Experts`. Gates scale the output (the grouped path scales the
    activation before the down projection: equal up to rounding). More than ``batch`` rows (the
    prompt's pass: 32 tokens x K experts would be 224 product pairs in Python) go to the grouped
    experts.
    """

    def __init__(self, experts: Experts, batch: int) -> None:
        super().__init__()
        self.n_experts, self.hidden, self.activation = experts.n_experts, experts.hidden, experts.activation
        self.grouped, self.batch = experts, batch
        self.register_buffer("up_t", experts.first_weight.detach().transpose(1, 2).contiguous(), persistent=False)
        self.register_buffer("down_t", experts.down_proj.detach().transpose(1, 2).contiguous(), persistent=False)

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        if x.shape[0] > self.batch:
            return self.grouped(x, index, weights)
        return chosen_experts(x, self.up_t, self.down_t, index, weights.to(x.dtype), self.activation)

    def extra_repr(self) -> str:
        return f"{self.n_experts} experts of {self.hidden}, only the chosen ones run"


@dataclass
class Preparation:
    """What :func:`prepare_for_decoding` chose: kernel per weight shape (out, in) and for experts."""

    batch: int
    linear: dict[tuple[int, int], str] = field(default_factory=dict)
    experts: str | None = None  # None: the model has no routed experts
    seconds: float = 0.0  # preparing and timing

    def summary(self) -> str:
        shapes = ", ".join(f"{o}x{i}: {k}" for (o, i), k in sorted(self.linear.items()))
        experts = f"; experts: {self.experts}" if self.experts else ""
        return f"batch {self.batch}: {shapes}{experts} ({self.seconds:.2f} s)"


def prepare_for_decoding(
    model: DecoderLM, batch: int, *, kernel: str = "auto", expert_kernel: str = "auto", rounds: int = 5
) -> tuple[DecoderLM, Preparation]:
    """A copy of ``model`` whose products run in the fastest layout for ``batch`` rows per step.

    ``kernel``: one of :data:`KERNELS` for every linear, or "auto": each candidate is timed on the
    model's weights (``rounds`` passes, round robin, fastest pass kept) and the fastest kept per
    weight shape. ``expert_kernel``: the same for the routed experts, one of
    :data:`EXPERT_KERNELS` or "auto". Shares parameters with ``model``, which is not modified;
    the returned copy is in eval mode.
    """
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"kernel must be 'auto' or one of {KERNELS}, got {kernel!r}")
    if expert_kernel != "auto" and expert_kernel not in EXPERT_KERNELS:
        raise ValueError(f"expert_kernel must be 'auto' or one of {EXPERT_KERNELS}, got {expert_kernel!r}")
    if batch < 1 or rounds < 1:
        raise ValueError(f"batch and rounds must be >= 1, got batch={batch}, rounds={rounds}")
    start = time.perf_counter()
    plan = Preparation(batch)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    # (experts, the router's K) of each MoE layer whose experts have no biases
    experts = [
        (m.experts, m.router.top_k)
        for m in model.modules()
        if type(getattr(m, "experts", None)) is Experts and m.experts.up_bias is None
    ]
    with torch.no_grad():
        swaps: dict[nn.Module, nn.Module] = {}  # the timed samples' winners are kept, not prepared again
        for shape, group in _by_shape(linears).items():
            if kernel == "auto":
                plan.linear[shape], timed = _fastest_linear(group, batch, rounds)
                swaps.update(timed)
            else:
                plan.linear[shape] = kernel
        swaps.update({m: PreparedLinear(m, plan.linear[_shape(m)], batch) for m in linears if m not in swaps})
        if experts:
            if expert_kernel == "auto":
                plan.experts, timed = _fastest_experts(experts, batch, rounds)
                swaps.update(timed)
            else:
                plan.experts = expert_kernel
            swaps.update({e: prepared_experts(e, plan.experts, batch) for e, _ in experts if e not in swaps})
    # grouped experts stay as they are: copied with the rest, not shared with the original
    prepared = _clone_with(model, {m: new for m, new in swaps.items() if new is not m}).eval()
    plan.seconds = time.perf_counter() - start
    return prepared, plan


def _shape(linear: nn.Linear) -> tuple[int, int]:
    return linear.out_features, linear.in_features


def _by_shape(linears: list[nn.Linear]) -> dict[tuple[int, int], list[nn.Linear]]:
    groups: dict[tuple[int, int], list[nn.Linear]] = {}
    for m in linears:
        groups.setdefault(_shape(m), []).append(m)
    return groups


def _fastest(candidates: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> str:
    """The candidate whose fastest timed call is fastest; calls run round robin after one warm-up."""
    best = dict.fromkeys(candidates, float("inf"))
    for fn in candidates.values():
        fn()
    for _ in range(rounds):
        for name, fn in candidates.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return min(best, key=best.__getitem__)


def _fastest_linear(group: list[nn.Linear], batch: int, rounds: int) -> tuple[str, dict[nn.Module, nn.Module]]:
    """The fastest kernel for the shape, timed by one pass over (up to 8 of) its weights per kernel
    (the weights come from memory, as in a decoding step), and the sample prepared with it."""
    sample = group[:8]
    weight = sample[0].weight
    x = torch.randn(batch, sample[0].in_features, device=weight.device, dtype=weight.dtype)
    prepared = {k: [PreparedLinear(m, k, batch) for m in sample] for k in available_kernels(weight)}
    candidates = {k: (lambda ps=ps: [p(x) for p in ps]) for k, ps in prepared.items()}
    best = _fastest(candidates, rounds, weight.device)
    return best, dict(zip(sample, prepared[best]))


def prepared_experts(experts: Experts, kernel: str, batch: int) -> nn.Module:
    """The experts run by ``kernel`` of :data:`EXPERT_KERNELS` ("grouped": as they are)."""
    if kernel not in EXPERT_KERNELS:
        raise ValueError(f"expert kernel must be one of {EXPERT_KERNELS}, got {kernel!r}")
    if kernel == "chosen":
        return ChosenExperts(experts, batch)
    if kernel == "grouped":
        return experts
    up, down = DenseExperts.stacked(experts)
    kind = "onednn" if "onednn" in available_kernels(up.weight) else "transposed"
    return DenseExperts(experts, PreparedLinear(up, kind, batch), PreparedLinear(down, kind, batch), batch)


def _fastest_experts(
    experts: list[tuple[Experts, int]], batch: int, rounds: int
) -> tuple[str, dict[nn.Module, nn.Module]]:
    """Which of :data:`EXPERT_KERNELS`, timed on a random routing of ``batch`` tokens to K experts
    each, and the sample (up to 6 layers) prepared with it."""
    sample = [e for e, _ in experts[:6]]
    first, K = sample[0], experts[0][1]
    E, device, dtype = first.n_experts, first.down_proj.device, first.down_proj.dtype
    x = torch.randn(batch, first.d_model, device=device, dtype=dtype)
    index = torch.rand(batch, E, device=device).argsort(-1)[:, :K]
    weights = torch.rand(batch, K, device=device)
    prepared = {k: [prepared_experts(e, k, batch) for e in sample] for k in EXPERT_KERNELS}
    candidates = {k: (lambda ms=ms: [m(x, index, weights) for m in ms]) for k, ms in prepared.items()}
    best = _fastest(candidates, rounds, device)
    return best, dict(zip(sample, prepared[best]))


def _clone_with(module: nn.Module, swaps: dict[nn.Module, nn.Module]) -> nn.Module:
    """A structural copy of ``module``: submodules in ``swaps`` replaced, the rest copied shallowly.

    Parameters and buffers are the original's tensors; the dicts that hold them, the submodules
    and the hooks are the copy's own, so hooks added to either model later stay with that model
    (hooks present now are in both)."""
    if module in swaps:
        return swaps[module]
    clone = copy.copy(module)  # a new __dict__ holding the same values
    for name, value in module.__dict__.items():
        if isinstance(value, dict):  # _parameters, _buffers and every hook registry: the copy's own
            clone.__dict__[name] = type(value)(value)
    clone.__dict__["_modules"] = {
        name: None if child is None else _clone_with(child, swaps) for name, child in module._modules.items()
    }
    return clone
