"""`moeformer convert` both ways: transformers dir -> moeformer checkpoint (with the model's own tokenizer)
and back, logits equal at each hop; existing or overlapping outputs refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from moeformer.cli import main
from moeformer.config import config_to_dict
from moeformer.data.bpe_tokenizer import BPETokenizer
from moeformer.data.hub_tokenizer import HubTokenizer
from moeformer.data.tokenizer import TokenizerPair
from moeformer.inference import load_model
from moeformer.train.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers", reason="convert tests load the results with transformers")

from hf_models import HF_CONFIGS, hf_model, lm_config, our_model, token_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def write_hub_tokenizer(directory, vocab_size: int) -> None:
    """A word-level tokenizer.json whose specials sit where a Hub model's would (eos last, no bos)."""
    words = [f"w{i}" for i in range(vocab_size - 2)]
    vocab = {w: i for i, w in enumerate(words)} | {"<unk>": vocab_size - 2, "<|endoftext|>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    settings = {"eos_token": "<|endoftext|>", "unk_token": "<unk>", "bos_token": None, "pad_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))


def test_hf_to_moeformer_keeps_logits_and_tokenizer(tmp_path, capsys):
    theirs = hf_model(HF_CONFIGS["qwen2_moe"]())
    theirs.save_pretrained(tmp_path / "hf")
    write_hub_tokenizer(tmp_path / "hf", theirs.config.vocab_size)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert "moeformer checkpoint (from qwen2_moe)" in capsys.readouterr().out
    loaded = load_model(tmp_path / "ours")
    tok = loaded.tokenizers.target
    assert isinstance(tok, HubTokenizer)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (96, 96, -1)
    assert tok.encode("w3 w5", bos=True, eos=True) == [3, 5, 96]
    tokens = token_batch(theirs.config.vocab_size)
    with torch.no_grad():
        expected = theirs(input_ids=tokens).logits
        assert (loaded.model(tokens).logits - expected).abs().max() < 1e-4
    assert main(["generate", str(tmp_path / "ours"), "--prompt", "w1 w2", "--max-new-tokens", "3", "--seed", "0"]) == 0
    (tmp_path / "text.txt").write_text("w1 w2 w3\nw4 w5 w6 w7\n")  # the imported gated shared expert, inspected
    assert main(["inspect", "routing", str(tmp_path / "ours"), "--data", str(tmp_path / "text.txt"),
                 "--out", str(tmp_path / "routing"), "--quiet"]) == 0  # fmt: skip
    layers = json.loads((tmp_path / "routing" / "routing.json").read_text())["layers"]
    shares = [layer["shared_share"] for layer in layers]
    assert len(shares) == 2 and all(0 < share < 1 for share in shares)


def test_moeformer_to_hf_and_back(tmp_path, capsys):
    tok = BPETokenizer.train(["the cat sat on the mat 你好"] * 30, vocab_size=280)
    config = lm_config(vocab_size=tok.vocab_size, moe={"kind": "topk", "n_experts": 4, "top_k": 2})
    model = our_model(config)
    meta = {"config": {"model": config_to_dict(config)}, "tokenizer": TokenizerPair(tok, tok).to_dict()}
    save_checkpoint(tmp_path / "run", 7, model, meta, {}, best=True)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "transformers mixtral checkpoint" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tok("the cat 你好", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tok.encode("the cat 你好")
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - model(ids).logits).abs().max() < 1e-4
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, model.eval()(ids).logits)
    assert back.tokenizers.target.encode("the cat 你好") == tok.encode("the cat 你好")


def test_convert_refuses_existing_and_overlapping_outputs(tmp_path, capsys):
    hf_model(HF_CONFIGS["llama"]()).save_pretrained(tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "taken")]) == 1
    assert "already exists; choose another output path or pass --force" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "hf" / "inside")]) == 1
    assert "overlaps the source" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "taken"), "--force"]) == 0  # empty: replaced
    assert "no tokenizer came along" in capsys.readouterr().err


def test_convert_force_replaces_only_a_model_directory(tmp_path, capsys, monkeypatch):
    """A user's folder, the working directory and a regular file are refused, before the model is read."""
    hf_model(HF_CONFIGS["llama"]()).save_pretrained(tmp_path / "hf")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.txt").write_text("three years")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "draft.txt").write_text("today's")
    monkeypatch.chdir(tmp_path / "work")
    capsys.readouterr()
    refused = {
        str(tmp_path / "thesis"): "does not look like a directory this tool wrote",
        ".": "refusing to write over the working directory",
        str(tmp_path / "notes.txt"): "exists and is not a directory",
    }
    with monkeypatch.context() as m:
        m.setattr("moeformer.interop.checkpoints.import_hf", lambda *a: pytest.fail("read before checking OUT"))
        for out, message in refused.items():
            assert main(["convert", str(tmp_path / "hf"), out, "--force"]) == 1
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "thesis" / "thesis.txt").read_text() == "three years"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "work" / "draft.txt").read_text() == "today's"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    for out in (tmp_path / "ours", tmp_path / "back"):  # our own outputs: --force may replace them
        source = tmp_path / ("hf" if out.name == "ours" else "ours")
        assert main(["convert", str(source), str(out), "--force"]) == 0


def test_a_weights_only_checkpoint_converts_both_ways_and_takes_a_tokenizer(tmp_path, capsys):
    theirs = hf_model(HF_CONFIGS["qwen2_moe"]())
    theirs.save_pretrained(tmp_path / "hf")  # no tokenizer.json
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert "no tokenizer came along" in capsys.readouterr().err
    tokens = token_batch(theirs.config.vocab_size)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(input_ids=tokens).logits - theirs(input_ids=tokens).logits).abs().max() < 1e-4
    generate = ["generate", str(tmp_path / "ours"), "--prompt", "w1 w2", "--max-new-tokens", "3"]
    assert main(generate) == 1
    assert "holds weights but no tokenizer" in capsys.readouterr().err
    (tmp_path / "tok").mkdir()
    write_hub_tokenizer(tmp_path / "tok", theirs.config.vocab_size)
    assert main([*generate, "--tokenizer", str(tmp_path / "tok" / "tokenizer.json")]) == 0
    (tmp_path / "text.txt").write_text("w1 w2 w3 w4 w5 w6 w7 w8\n")
    assert main(["eval", str(tmp_path / "ours"), "--data", str(tmp_path / "text.txt"), "--tokenizer",
                 str(tmp_path / "tok")]) == 0  # fmt: skip
    capsys.readouterr()
    with_tok = ["convert", str(tmp_path / "ours"), str(tmp_path / "with-tok"), "--tokenizer", str(tmp_path / "tok")]
    assert main(with_tok) == 0
    assert "no tokenizer" not in capsys.readouterr().err
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "with-tok")("w3 w5")["input_ids"] == [3, 5]


def test_convert_refuses_a_model_without_counterpart(tmp_path, capsys):
    tok = BPETokenizer.train(["a b c"] * 5, vocab_size=270)
    config = lm_config(vocab_size=tok.vocab_size, moe={"kind": "soft", "n_experts": 4})
    meta = {"config": {"model": config_to_dict(config)}, "tokenizer": TokenizerPair(tok, tok).to_dict()}
    save_checkpoint(tmp_path / "run", 1, our_model(config), meta, {}, best=True)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 1
    assert "'soft'" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_transformers_directory_is_read_directly_by_generate_and_report(tmp_path, capsys):
    """No convert step: load_model imports a transformers directory (with its tokenizer) in memory."""
    theirs = hf_model(HF_CONFIGS["mixtral"]())
    theirs.save_pretrained(tmp_path / "hf")
    write_hub_tokenizer(tmp_path / "hf", theirs.config.vocab_size)
    loaded = load_model(tmp_path / "hf")
    tokens = token_batch(theirs.config.vocab_size)
    with torch.no_grad():
        assert (loaded.model(tokens).logits - theirs(input_ids=tokens).logits).abs().max() < 1e-4
    (tmp_path / "text.txt").write_text("w1 w2 w3\nw4 w5 w6 w7\n")
    args = ["report", str(tmp_path / "hf"), "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "r")]
    assert main([*args, "--quiet"]) == 0
    assert (tmp_path / "r" / "report.html").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
