"""Expert routing seen from outside the model: per token for one sentence, totals over a corpus.

Shapes: N tokens of a batch (B * T, padding included), D model width, E routed experts, K
experts per token, V vocabulary.

Hooks on each :class:`~moeformer.moe.layer.MoELayer` read, per forward pass: the router's
scores (N, E); the ``index`` / ``weights`` (N, K) the experts receive (after padding and capacity:
index E marks "no expert"); the experts' weighted output (N, D) and the layer's output (N, D),
whose difference is what the shared experts added. Per layer and over a corpus we report:

- load: assignments per expert (equal to the layer's own ``tokens_per_expert`` statistics);
- router entropy: mean entropy of each token's gate distribution (confidence; <= log E) and
  load entropy: entropy of the expert loads (balance; log E when every expert is used equally);
- shared share: mean over tokens of |shared| / (|shared| + |routed|), the norms of the two
  contributions to the token's output (0 without shared experts, 1 if routed experts added 0);
- specialisation: mutual information between expert choice and token id, token script
  (Latin / Han / other) and, for an LM read over parallel data, the side (source / target).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moeformer.data.tokenizer import Tokenizer
from moeformer.inference import LoadedModel
from moeformer.inspect.corpus import InspectError, Item, SentenceBatch, batches, encode_item
from moeformer.inspect.measures import entropy, mutual_information, pointwise_mutual_information
from moeformer.inspect.tokens import SCRIPTS, token_labels, token_script
from moeformer.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """MoE layers by block name ("encoder.0", "layers.3"): the keys of the model's routing stats."""
    found = {name.removesuffix(".ffn"): m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not found:
        raise InspectError(
            f"this {type(model).__name__} has no MoE layer: every FFN is dense (no [model.moe] or kind 'dense'), "
            "so there is no routing to show; use a checkpoint trained with moe.kind soft, topk or deepseek"
        )
    return found


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[dict[str, dict[str, Tensor]]]:
    """Inside the block, each forward fills ``{layer: {scores, index, weights, routed, total}}``."""
    store: dict[str, dict[str, Tensor]] = {}

    def put(name: str, key: str, value: Tensor) -> None:
        store.setdefault(name, {})[key] = value.detach()

    def hooks(name: str) -> dict[str, Any]:
        def experts_in(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            put(name, "index", _arg(args, kwargs, 1, "index"))
            put(name, "weights", _arg(args, kwargs, 2, "weights"))

        return {
            "router": lambda m, a, out: put(name, "scores", out.scores),
            "experts_in": experts_in,
            "experts_out": lambda m, a, out: put(name, "routed", out),
            "layer": lambda m, a, out: put(name, "total", out.output.reshape(-1, out.output.shape[-1])),
        }

    with ExitStack() as stack:
        for name, layer in moe_layers(model).items():
            h = hooks(name)
            stack.callback(layer.router.register_forward_hook(h["router"]).remove)
            stack.callback(layer.experts.register_forward_pre_hook(h["experts_in"], with_kwargs=True).remove)
            stack.callback(layer.experts.register_forward_hook(h["experts_out"]).remove)
            stack.callback(layer.register_forward_hook(h["layer"]).remove)
        yield store


def _arg(args: tuple, kwargs: dict[str, Any], position: int, name: str) -> Tensor:
    return args[position] if len(args) > position else kwargs[name]


@dataclass
class LayerRouting:
    """Corpus totals of one MoE layer."""

    name: str
    n_experts: int
    top_k: int
    by_token: Tensor  # (V, E) float64: assignments of each token id to each expert
    by_side: Tensor  # (2, E) float64: assignments by side of the pair (LM over parallel data)
    n_tokens: int = 0  # real (non-padding) tokens routed
    dropped: int = 0  # assignments dropped for capacity
    entropy_sum: float = 0.0  # sum over tokens of the gate entropy
    shared_share_sum: float = 0.0

    @property
    def counts(self) -> Tensor:
        """(E,) assignments per expert."""
        return self.by_token.sum(0)

    def add(self, captured: dict[str, Tensor], ids: Tensor, padding_mask: Tensor, sides: Tensor | None) -> None:
        """One forward's capture; ``ids``/``padding_mask`` (B, T) of this layer's stack (True at padding),
        ``sides`` (B,) or None."""
        if "index" not in captured or "routed" not in captured:
            raise InspectError(f"{self.name}: the experts were not called directly (expert parallelism?)")
        real = ~padding_mask.reshape(-1).cpu()
        index, ids = captured["index"].cpu()[real], ids.reshape(-1).cpu()[real]
        kept = index < self.n_experts
        self.dropped += int((~kept).sum())
        token = ids[:, None].expand_as(index)[kept]
        cells = token * self.n_experts + index[kept]
        self.by_token += torch.bincount(cells, minlength=self.by_token.numel()).view_as(self.by_token).double()
        if sides is not None:
            side = sides.cpu()[:, None].expand(-1, real.numel() // sides.numel()).reshape(-1)[real]
            cells = side[:, None].expand_as(index)[kept] * self.n_experts + index[kept]
            self.by_side += torch.bincount(cells, minlength=self.by_side.numel()).view_as(self.by_side).double()
        self.n_tokens += int(real.sum())
        self.entropy_sum += float(entropy(captured["scores"].cpu()[real]).sum())
        routed, total = captured["routed"].float().cpu()[real], captured["total"].float().cpu()[real]
        shared_norm, routed_norm = (total - routed).norm(dim=-1), routed.norm(dim=-1)
        self.shared_share_sum += float((shared_norm / (shared_norm + routed_norm).clamp_min(1e-12)).sum())

    def summary(self, tokenizer: Tokenizer, *, top: int = 5, min_count: int = 3) -> dict[str, Any]:
        """JSON-able measures; ``top`` tokens most over-represented at each expert (PMI, >= min_count)."""
        counts, n = self.counts, max(self.n_tokens, 1)
        scripts = script_table(self.by_token, tokenizer)
        has_sides = bool(self.by_side[0].sum() > 0 and self.by_side[1].sum() > 0)
        return {
            "layer": self.name,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "tokens": self.n_tokens,
            "load": (counts / counts.sum().clamp_min(1)).tolist(),
            "dropped_fraction": self.dropped / max(self.n_tokens * self.top_k, 1),
            "router_entropy": self.entropy_sum / n,
            "load_entropy": float(entropy(counts)) if counts.sum() > 0 else 0.0,
            "max_entropy": float(torch.tensor(float(self.n_experts)).log()),
            "shared_share": self.shared_share_sum / n,
            "mi_token": mutual_information(self.by_token),
            "mi_script": mutual_information(scripts),
            "mi_side": mutual_information(self.by_side) if has_sides else None,
            "script_load": {s: scripts[i].tolist() for i, s in enumerate(SCRIPTS)},
            "top_tokens": top_tokens(self.by_token, tokenizer, top=top, min_count=min_count),
        }


def script_table(by_token: Tensor, tokenizer: Tokenizer) -> Tensor:
    """(3, E) assignments by the script of the token (Latin, Han, other), from a (V, E) table."""
    table = torch.zeros(len(SCRIPTS), by_token.shape[1], dtype=torch.float64)
    for token in by_token.sum(1).nonzero().flatten().tolist():
        table[SCRIPTS.index(token_script(tokenizer.decode([token])))] += by_token[token]
    return table


def top_tokens(by_token: Tensor, tokenizer: Tokenizer, *, top: int, min_count: int) -> list[list[str]]:
    """For each expert, the labels of the tokens with the highest PMI among those seen ``min_count`` times."""
    pmi = pointwise_mutual_information(by_token).masked_fill(by_token < min_count, float("-inf"))
    out = []
    for e in range(by_token.shape[1]):
        values, ids = pmi[:, e].topk(min(top, pmi.shape[0]))
        out.append([_vocab_label(tokenizer, i) for v, i in zip(values.tolist(), ids.tolist()) if v > float("-inf")])
    return out


def _vocab_label(tokenizer: Tokenizer, token: int) -> str:
    label = token_labels(tokenizer, [token])[0]
    return tokenizer.decode([token]) if label == "·" else label


def _new_layers(loaded: LoadedModel) -> dict[str, LayerRouting]:
    out = {}
    tok = loaded.tokenizers
    for name, layer in moe_layers(loaded.model).items():
        vocab = tok.source.vocab_size if name.startswith("encoder.") else tok.target.vocab_size
        E = layer.router.n_experts
        tables = torch.zeros(vocab, E, dtype=torch.float64), torch.zeros(2, E, dtype=torch.float64)
        out[name] = LayerRouting(name, E, layer.router.top_k, *tables)
    return out


@torch.no_grad()
def corpus_routing(
    loaded: LoadedModel, items: Sequence[Item], *, batch_size: int = 32, progress: bool = False
) -> dict[str, LayerRouting]:
    """Routing totals of every MoE layer over ``items`` (see :func:`~moeformer.inspect.corpus.read_items`)."""
    model, arch = loaded.model.eval(), loaded.model.config.arch
    layers = _new_layers(loaded)  # fails on a dense model before any work
    examples = [encode_item(item, loaded.tokenizers, arch, model.config.max_seq_len) for item in items]
    device = next(model.parameters()).device
    pad = loaded.tokenizers.target.pad_id
    n_batches = -(-len(examples) // batch_size)
    with capture_routing(model) as store:
        for batch in tqdm(batches(examples, pad, batch_size), total=n_batches, desc="routing", disable=not progress):
            store.clear()
            model(**{k: v.to(device) for k, v in batch.inputs.items()})
            _add_batch(layers, store, batch)
    return layers


def _add_batch(layers: dict[str, LayerRouting], store: dict[str, dict[str, Tensor]], batch: SentenceBatch) -> None:
    for name, layer in layers.items():
        ids, padding_mask = batch.stacks[name.split(".")[0]]
        layer.add(store.get(name, {}), ids, padding_mask, batch.sides)


@dataclass
class SentenceRouting:
    """Which experts each token of one input went to, per MoE layer."""

    tokens: dict[str, list[str]]  # stack ("encoder", "decoder", "layers") -> token labels
    index: dict[str, Tensor] = field(default_factory=dict)  # layer -> (T, K) experts, best first
    weights: dict[str, Tensor] = field(default_factory=dict)  # layer -> (T, K) gate weights
    n_experts: dict[str, int] = field(default_factory=dict)


@torch.no_grad()
def sentence_routing(loaded: LoadedModel, item: Item) -> SentenceRouting:
    model, tok = loaded.model.eval(), loaded.tokenizers
    layers = moe_layers(model)
    example = encode_item(item, tok, model.config.arch, model.config.max_seq_len)
    batch = next(batches([example], tok.target.pad_id, 1))
    device = next(model.parameters()).device
    with capture_routing(model) as store:
        model(**{k: v.to(device) for k, v in batch.inputs.items()})
    tokenizers = {"encoder": tok.source, "decoder": tok.target, "layers": tok.source}
    labels = {s: token_labels(tokenizers[s], ids[0].tolist()) for s, (ids, _) in batch.stacks.items()}
    out = SentenceRouting(labels)
    for name, layer in layers.items():
        weights, order = store[name]["weights"].cpu().sort(dim=-1, descending=True)
        out.index[name] = store[name]["index"].cpu().gather(1, order)
        out.weights[name] = weights
        out.n_experts[name] = layer.router.n_experts
    return out
