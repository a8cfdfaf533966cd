"""Dense -> MoE upcycling: a trained dense model's FFNs become MoE layers, every other weight kept.

Shapes: D model width, F the dense FFN's hidden size, H one expert's hidden size, E routed experts.

- Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): every routed expert is a copy of
  the dense FFN (H = F) and the router is new. With the top-k weights renormalised to sum 1
  (kind ``topk``, ``normalize = true``, no shared expert) each token computes
  sum_i g_i FFN(x) = FFN(x): the upcycled model equals the dense one at initialisation, whatever
  the router says (tests: logits within 1e-5).
- Fine-grained upcycling (DeepSeekMoE's segmentation applied to the dense FFN, as Qwen1.5-MoE was
  upcycled from Qwen-1.8B): F is cut into m = F / H segments of H hidden units, and since a
  SwiGLU/ReLU FFN acts per hidden unit, FFN(x) = sum_j FFN_j(x) over the segments exactly (tested).
  The shared experts take the first segments, routed expert i the segment (K_s + i) mod m, so
  copies of every segment cycle over the routed experts. A token would need every segment with
  weight 1 to compute FFN(x); the router gives it m*K - K_s routed pieces with weights below 1,
  so this construction is *not* exact at initialisation: :func:`logit_gap` measures how far.
- Layers that stay dense (``placement``, ``first_dense``), attention, norms and embeddings are
  copied as they are. Router weights start as in a fresh model (seeded), the balancing bias at 0;
  optimiser state is not carried over: training restarts its optimiser from this point.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moeformer.layers.feedforward import FeedForward
from moeformer.model_config import MoEConfig
from moeformer.models import build_model
from moeformer.moe.layer import MoELayer


class UpcycleError(ValueError):
    """The dense model cannot be upcycled as asked; the message says why and what is allowed."""


def upcycle(model: nn.Module, moe: MoEConfig, *, seed: int = 0) -> nn.Module:
    """A new model: ``model``'s config with ``moe``, its dense FFNs turned into MoE layers (see module doc)."""
    if getattr(model.config, "moe", None) is not None:
        raise UpcycleError("the model already has MoE layers; upcycling starts from a dense model")
    torch.manual_seed(seed)  # routers start as in a fresh model of this seed
    new = build_model(dataclasses.replace(model.config, moe=moe))
    old_modules = dict(model.named_modules())
    state = new.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in state and state[name].shape == tensor.shape:
                state[name] = tensor.clone()
        for name, layer in new.named_modules():
            if isinstance(layer, MoELayer):
                dense = old_modules.get(name)
                if not isinstance(dense, FeedForward):
                    raise UpcycleError(
                        f"{name}: expected a dense FFN in the source model, found {type(dense).__name__}"
                    )
                state.update(_expert_weights(name, layer, dense))
    new.load_state_dict(state)
    return new.train(model.training)


def _expert_weights(name: str, layer: MoELayer, dense: FeedForward) -> dict[str, Tensor]:
    """The experts' (and shared experts') tensors of ``layer``, cut from the dense FFN."""
    experts = layer.experts
    F, H, E = dense.up_proj.out_features, experts.hidden, experts.n_experts
    if F % H:
        raise UpcycleError(f"{name}: an expert's hidden size ({H}) must divide the dense FFN's ({F})")
    m = F // H
    gated = dense.activation == "swiglu"
    has_bias = dense.up_proj.bias is not None
    if has_bias and m > 1:
        raise UpcycleError(f"{name}: fine-grained upcycling of an FFN with biases is not supported (the down "
                           "projection's bias belongs to no segment); use experts of the dense size")  # fmt: skip

    def segment(j: int) -> tuple[Tensor, Tensor]:
        rows = slice(j * H, (j + 1) * H)
        first = [dense.gate_proj.weight[rows]] if gated else []
        return torch.cat([*first, dense.up_proj.weight[rows]]), dense.down_proj.weight[:, rows]

    out: dict[str, Tensor] = {}
    shared = layer.shared_experts
    n_shared_segments = 0
    if shared is not None:
        S = shared.up_proj.out_features
        if S % H or S > F:
            raise UpcycleError(
                f"{name}: the shared experts' hidden size ({S}) must be a multiple of {H} and at most {F}"
            )
        n_shared_segments = S // H
        rows = slice(0, S)
        for proj in ("gate_proj", "up_proj") if gated else ("up_proj",):
            out[f"{name}.shared_experts.{proj}.weight"] = getattr(dense, proj).weight[rows].clone()
        out[f"{name}.shared_experts.down_proj.weight"] = dense.down_proj.weight[:, rows].clone()
    pieces = [segment((n_shared_segments + i) % m) for i in range(E)]
    out[f"{name}.experts.{experts.first_name}"] = torch.stack([p[0] for p in pieces]).clone()
    out[f"{name}.experts.down_proj"] = torch.stack([p[1] for p in pieces]).clone()
    if has_bias:
        up_bias = torch.cat([dense.gate_proj.bias, dense.up_proj.bias]) if gated else dense.up_proj.bias
        out[f"{name}.experts.up_bias"] = up_bias.expand(E, -1).clone()
        out[f"{name}.experts.down_bias"] = dense.down_proj.bias.expand(E, -1).clone()
    return out


@torch.no_grad()
def logit_gap(dense: nn.Module, upcycled: nn.Module, tokens: Tensor) -> dict[str, float]:
    """How far the upcycled model is from the dense one on ``tokens`` (B, T) of a decoder LM, or
    (src, tgt) pairs for a seq2seq model: max |logit difference| and mean KL(dense || upcycled)."""
    dense.eval(), upcycled.eval()
    args = tokens if isinstance(tokens, tuple) else (tokens,)
    a, b = dense(*args).logits.float(), upcycled(*args).logits.float()
    kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean()
    return {"max_abs_logit_diff": float((a - b).abs().max()), "mean_kl": float(kl)}
