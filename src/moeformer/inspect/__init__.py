"""See inside a trained model: attention maps, expert routing, and a one-page HTML report.

    loaded = load_model("runs/tatoeba-en-zh-deepseek")
    maps = attention_maps(loaded, sentence_item(loaded, "Are you OK?"))   # greedy translation as target
    maps.maps["decoder.0.cross_attn"]                                       # (heads, target, source)
    layers = corpus_routing(loaded, read_items("pairs.tsv", "seq2seq", limit=500))
    layers["decoder.1"].summary(loaded.tokenizers.target)["mi_token"]      # I(expert; token), nats

Modules: ``corpus`` (data in), ``tokens`` (axis labels), ``attention``, ``routing`` and
``measures`` (the numbers), ``fonts`` and ``plots`` / ``curves`` (the pictures), ``pictures``,
``report`` and ``run`` (the commands' outputs). Nothing here changes a model: everything is read
through forward hooks that are removed when done.
"""

from moeformer.inspect.attention import AttentionMaps, attention_maps, capture_attention, sentence_item
from moeformer.inspect.corpus import InspectError, Item, read_items
from moeformer.inspect.routing import LayerRouting, capture_routing, corpus_routing, moe_layers, sentence_routing
from moeformer.inspect.run import inspect_attention, inspect_routing, write_report

__all__ = [
    "AttentionMaps",
    "InspectError",
    "Item",
    "LayerRouting",
    "attention_maps",
    "capture_attention",
    "capture_routing",
    "corpus_routing",
    "inspect_attention",
    "inspect_routing",
    "moe_layers",
    "read_items",
    "sentence_item",
    "sentence_routing",
    "write_report",
]
