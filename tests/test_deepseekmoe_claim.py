"""examples/deepseekmoe_claim.py: the comparison is fair by construction (equal active and total
expert parameters), its commands build the models they name, and its corpus mixes every source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moeformer.config import load_config
from moeformer.inspect.routing import moe_layers
from moeformer.models import build_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import deepseekmoe_claim as claim  # noqa: E402


def _model(variant: str, tmp_path: Path):
    cmd = claim.run_command(variant, 0, 10, tmp_path / "corpus.txt", tmp_path / "run")
    overrides = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    return build_model(load_config(claim.BASE_CONFIG, overrides).model)


def _ffn_parameters(model) -> tuple[int, int]:
    """(total, active per token) parameters of the FFN experts (routed + shared), routers left out."""
    layers = moe_layers(model)
    total = active = 0
    for layer in layers.values():
        routed = sum(p.numel() for p in layer.experts.parameters())
        shared = sum(p.numel() for p in layer.shared_experts.parameters()) if layer.shared_experts else 0
        E, K = layer.router.n_experts, layer.router.top_k
        total += routed + shared
        active += routed * K // E + shared
    return total, active


@pytest.mark.parametrize("variant", [v for v in claim.VARIANTS if v != "dense"])
def test_every_moe_variant_has_gshards_total_and_the_dense_active_ffn(variant, tmp_path):
    dense = _model("dense", tmp_path)
    dense_ffn = sum(p.numel() for name, p in dense.named_parameters() if ".ffn." in name)
    gshard_total, _ = _ffn_parameters(_model("gshard", tmp_path))
    total, active = _ffn_parameters(_model(variant, tmp_path))
    assert active == dense_ffn
    assert total == gshard_total == 4 * dense_ffn


def test_the_variants_are_what_their_names_say(tmp_path):
    shape = {}
    for variant in claim.VARIANTS:
        layers = moe_layers(m) if (m := _model(variant, tmp_path)) and variant != "dense" else {}
        layer = next(iter(layers.values()), None)
        shape[variant] = None if layer is None else (layer.router.n_experts, layer.router.top_k, layer.experts.hidden)
    assert shape == {
        "dense": None,
        "gshard": (8, 2, 256),
        "deepseek": (31, 7, 64),  # m = 4: 32 pieces of 64, one shared
        "deepseek-no-shared": (32, 8, 64),
        "deepseek-m1": (7, 1, 256),
        "deepseek-m2": (15, 3, 128),
        "deepseek-m8": (63, 15, 32),
    }


def _fake_data(root: Path) -> Path:
    (root / "tinyshakespeare").mkdir(parents=True)
    (root / "tinyshakespeare" / "input.txt").write_text("ROMEO:\nHello.\n\nJULIET:\nGood night.\n" * 50)
    (root / "wikitext-2").mkdir()
    for split in ("valid", "test"):
        (root / "wikitext-2" / f"{split}.txt").write_text(" = Title = \n\n A well @-@ known fact , 1 @,@ 000 .\n" * 50)
    (root / "cmn-eng").mkdir()
    (root / "cmn-eng" / "cmn.txt").write_text("Hi.\t嗨。\tCC-BY\n" * 200)
    (root / "refusal" / "splits").mkdir(parents=True)
    for split in ("train", "val", "test"):
        rows = [{"instruction": f"Name a colour ({split} {i}).", "category": None} for i in range(60)]
        (root / "refusal" / "splits" / f"harmless_{split}.json").write_text(json.dumps(rows))
    return root


def test_the_corpus_mixes_every_source_in_chunks_and_is_repeatable(tmp_path):
    data = _fake_data(tmp_path / "data")
    sizes = claim.build_corpus(data, tmp_path / "a.txt")
    claim.build_corpus(data, tmp_path / "b.txt")
    text = (tmp_path / "a.txt").read_text()
    assert text == (tmp_path / "b.txt").read_text()
    assert set(sizes) == {"shakespeare", "wikitext", "tatoeba_en", "alpaca"}
    assert all(s["chunks"] > 0 and s["characters"] > 0 for s in sizes.values())
    assert "well-known fact , 1,000" in text and "@-@" not in text
    assert "嗨" not in text  # the English side only
    tail = text[-len(text) // 3 :]  # the held-out windows come from the end: it mixes sources
    assert sum(marker in tail for marker in ("ROMEO", "well-known", "Hi.", "Name a colour")) >= 3


def test_a_missing_source_is_named(tmp_path):
    data = _fake_data(tmp_path / "data")
    (data / "wikitext-2" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"wikitext-2/test.txt: missing"):
        claim.build_corpus(data, tmp_path / "corpus.txt")
    assert not (tmp_path / "corpus.txt").exists()
