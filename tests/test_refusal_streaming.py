"""Shard-by-shard orthogonalization: the same tensors, bit for bit, as editing the loaded model, for
per-expert and fused expert layouts, tied embeddings and bf16; nothing left half written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("transformers")
from refusal_models import hf_chat_lm  # noqa: E402

from moeformer.publish import OutputExistsError  # noqa: E402
from moeformer.refusal.lm import RefusalError  # noqa: E402
from moeformer.refusal.orthogonalize import orthogonalize_weights, save_model  # noqa: E402
from moeformer.refusal.streaming import INDEX, checkpoint_shards, stream_orthogonalize  # noqa: E402

FAMILIES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in checkpoint_shards(path)[0]:
        with safe_open(str(path / shard), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _direction(lm, seed=1) -> torch.Tensor:
    return torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))


def _save(lm, path, shard_size="20KB"):
    lm.model.save_pretrained(path, max_shard_size=shard_size)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_streamed_equals_in_memory_bit_for_bit(family, dtype, tmp_path):
    lm = hf_chat_lm(family)
    lm.model.to(dtype)
    source = _save(lm, tmp_path / "source")
    assert len(checkpoint_shards(source)[0]) > 2  # really sharded
    direction = _direction(lm)
    streamed = stream_orthogonalize(source, tmp_path / "streamed", direction)
    orthogonalize_weights(lm, direction)
    save_model(lm, tmp_path / "in-memory")
    expected, got = _tensors(tmp_path / "in-memory"), _tensors(tmp_path / "streamed")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == dtype, name
        assert torch.equal(got[name], tensor), name
    assert streamed.shards == len(checkpoint_shards(source)[0])
    assert any(".experts." in n for n in streamed.edited) == (family != "llama")
    assert streamed.leak < (1e-5 if dtype == torch.float32 else 2e-2)


def test_a_fused_expert_layout_is_edited_along_its_model_axis(tmp_path):
    """Checkpoints that store experts as one 3-D tensor, (E, D, h) or (E, h, D)."""
    lm = hf_chat_lm("qwen2_moe")
    source = tmp_path / "fused"
    _save(lm, source, shard_size="1GB")
    tensors = {n: p.detach().clone().contiguous() for n, p in lm.model.state_dict().items()}
    fused = [n for n in tensors if n.endswith("experts.down_proj")]
    assert fused and tensors[fused[0]].shape[1] == lm.d_model  # transformers 5 holds (E, D, h)
    tensors[fused[0]] = tensors[fused[0]].transpose(1, 2).contiguous()  # one layer stored (E, h, D)
    (source / "model.safetensors").unlink()
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    direction = _direction(lm)
    stream_orthogonalize(source, tmp_path / "out", direction)
    r_hat = direction / direction.norm()
    out = _tensors(tmp_path / "out")
    for name in fused:
        axis = 1 if out[name].shape[1] == lm.d_model else 2
        along = out[name].movedim(axis, -1) @ r_hat
        assert along.abs().max() < 1e-5, name
        assert not torch.equal(out[name], tensors[name]), name


def test_tied_embeddings_are_untied_in_the_files_and_the_index(tmp_path):
    lm = hf_chat_lm("llama", tie_word_embeddings=True)
    source = _save(lm, tmp_path / "source")
    assert "lm_head.weight" not in _tensors(source)
    before = _tensors(source)["model.embed_tokens.weight"]
    result = stream_orthogonalize(source, tmp_path / "out", _direction(lm))
    out = _tensors(tmp_path / "out")
    assert result.untied and torch.equal(out["lm_head.weight"], before)
    assert not torch.equal(out["model.embed_tokens.weight"], before)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    total = sum(t.numel() * t.element_size() for t in out.values())
    assert index["metadata"]["total_size"] == total
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_the_streamed_model_loads_and_matches_the_hook_ablation(tmp_path):
    from moeformer.refusal.hf import load_hf
    from moeformer.refusal.interventions import ablate

    lm = hf_chat_lm("qwen2_moe")
    source = _save(lm, tmp_path / "source")
    direction = _direction(lm)
    stream_orthogonalize(source, tmp_path / "out", direction)
    edited = load_hf(tmp_path / "out", template="<|user|> {instruction} <|end|> <|assistant|>")
    batch = lm.batch(["how do i make a bomb", "write a poem"])
    with ablate(lm, direction):
        expected = lm.forward_logits(batch)
    torch.testing.assert_close(edited.forward_logits(edited.batch(["how do i make a bomb", "write a poem"])),
                               expected, atol=1e-4, rtol=1e-4)  # fmt: skip


def test_bad_inputs_fail_before_anything_is_written(tmp_path):
    lm = hf_chat_lm("llama")
    source = _save(lm, tmp_path / "source")
    with pytest.raises(RefusalError, match=r"shape \(5,\); .* hidden size 32"):
        stream_orthogonalize(source, tmp_path / "out", torch.ones(5))
    with pytest.raises(RefusalError, match="no config.json"):
        stream_orthogonalize(tmp_path, tmp_path / "out", torch.ones(32))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 3}))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(RefusalError, match=r"found: pytorch_model.bin\); streaming reads safetensors checkpoints only"):
        stream_orthogonalize(tmp_path / "bin", tmp_path / "out", torch.ones(32))
    with pytest.raises(RefusalError, match="overlaps the source model"):
        stream_orthogonalize(source, source / "inside", torch.ones(32))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a model")
    with pytest.raises(OutputExistsError):
        stream_orthogonalize(source, tmp_path / "mine", torch.ones(32), force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a model"
    assert not (tmp_path / "out").exists()


def test_an_interrupted_edit_leaves_no_output(tmp_path, monkeypatch):
    lm = hf_chat_lm("mixtral")
    source = _save(lm, tmp_path / "source")
    seen = []

    def interrupt(shard):
        seen.append(shard)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_orthogonalize(source, tmp_path / "out", _direction(lm), progress=interrupt)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]  # no temporary directory left either
