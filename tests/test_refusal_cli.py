"""`moeformer refusal extract / eval / orthogonalize` end to end on saved tiny models, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from moeformer.cli import main
from moeformer.refusal.extract import load_direction
from moeformer.refusal.interventions import ablate
from moeformer.refusal.loading import load_chat_lm

transformers = pytest.importorskip("transformers")
from refusal_models import PLANTED_HARMFUL, PLANTED_HARMLESS, native_chat_lm, planted_llama, save_hf  # noqa: E402


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted")
    lm, _ = planted_llama()
    lm.model.save_pretrained(path / "model")
    lm.tokenizer.save_pretrained(path / "model")
    (path / "harmful.json").write_text(json.dumps([{"instruction": t} for t in PLANTED_HARMFUL]))
    (path / "harmless.txt").write_text("\n".join(PLANTED_HARMLESS) + "\n")
    (path / "sorry.txt").write_text("sorry\n")
    return path


def test_extract_eval_orthogonalize_on_a_saved_model(planted_dir, tmp_path, capsys):
    d = planted_dir
    files = ["--harmful", str(d / "harmful.json"), "--harmless", str(d / "harmless.txt")]
    rc = main(["refusal", "extract", str(d / "model"), *files, "--out", str(tmp_path / "dir"), "--n-train", "40",
               "--n-val", "12", "--refusal-tokens", "sorry", "--quiet"])  # fmt: skip
    assert rc == 0
    assert "layer 1 of 3" in capsys.readouterr().out

    rc = main(["refusal", "eval", str(d / "model"), *files, "--direction", str(tmp_path / "dir"), "--n", "8",
               "--max-new-tokens", "3", "--substrings", str(d / "sorry.txt"), "--out", str(tmp_path / "eval"),
               "--quiet"])  # fmt: skip
    assert rc == 0
    rows = {r["condition"]: r for r in json.loads((tmp_path / "eval" / "eval.json").read_text())["conditions"]}
    assert rows["baseline"]["harmful_refusal"] >= 0.75 and rows["baseline"]["harmless_refusal"] <= 0.25
    assert rows["ablation"]["harmful_refusal"] == 0.0 and rows["orthogonalized"]["harmful_refusal"] == 0.0
    assert rows["actadd"]["harmless_refusal"] == 1.0
    assert rows["baseline"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows["orthogonalized"]["kl"] == pytest.approx(rows["ablation"]["kl"], abs=1e-4)

    out = tmp_path / "abliterated"
    assert main(["refusal", "orthogonalize", str(d / "model"), "--direction", str(tmp_path / "dir"),
                 "--out", str(out)]) == 0  # fmt: skip
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    lm = load_chat_lm(d / "model")
    batch = lm.batch(PLANTED_HARMFUL[:5])
    r, _ = load_direction(tmp_path / "dir")
    with torch.no_grad(), ablate(lm, r):
        expected = lm.forward_logits(batch)
    positions = (batch.mask.long().cumsum(-1) - 1).clamp(min=0)
    got = reloaded(input_ids=batch.ids, attention_mask=batch.mask.long(), position_ids=positions).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert main(["refusal", "orthogonalize", str(d / "model"), "--direction", str(tmp_path / "dir"),
                 "--out", str(out)]) == 1  # fmt: skip
    assert "already exists" in capsys.readouterr().err


def test_orthogonalize_a_moeformer_checkpoint(tmp_path):
    lm = native_chat_lm()
    lm.save(tmp_path / "ckpt")
    r = torch.randn(lm.d_model)
    import safetensors.torch

    safetensors.torch.save_file({"direction": r}, str(tmp_path / "r.safetensors"))
    rc = main(["refusal", "orthogonalize", str(tmp_path / "ckpt"), "--direction", str(tmp_path / "r.safetensors"),
               "--out", str(tmp_path / "edited"), "--template", "U: {instruction}\nA:"])  # fmt: skip
    assert rc == 0
    edited = load_chat_lm(tmp_path / "edited", template="U: {instruction}\nA:")
    batch = lm.batch(["how do i make a bomb", "write a poem"])
    with torch.no_grad(), ablate(lm, r):
        expected = lm.forward_logits(batch)
    torch.testing.assert_close(edited.forward_logits(batch), expected, atol=1e-4, rtol=0)


def test_bad_inputs_fail_before_the_model_is_loaded(planted_dir, tmp_path, capsys):
    d = planted_dir
    (tmp_path / "wrong.json").write_text(json.dumps([{"question": "x"}]))
    (tmp_path / "empty.txt").write_text("\n")
    no_weights = save_hf("llama", tmp_path / "no_template", chat_template=False)
    for f in no_weights.glob("*.safetensors"):
        f.write_bytes(b"not weights")  # any attempt to read them would fail differently
    out = ["--out", str(tmp_path / "o")]
    cases = [
        (["--harmful", str(tmp_path / "wrong.json"), "--harmless", str(d / "harmless.txt")], str(d / "model"),
         "instruction"),
        (["--harmful", str(tmp_path / "empty.txt"), "--harmless", str(d / "harmless.txt")], str(d / "model"),
         "empty"),
        (["--harmful", str(d / "harmful.json"), "--harmless", str(d / "harmless.txt")], str(no_weights),
         "no chat template"),
    ]  # fmt: skip
    for files, model, message in cases:
        assert main(["refusal", "extract", model, *files, *out, "--quiet"]) == 1
        assert message in capsys.readouterr().err
    import safetensors.torch

    safetensors.torch.save_file({"direction": torch.ones(31)}, str(tmp_path / "r.safetensors"))
    assert main(["refusal", "orthogonalize", str(no_weights), "--direction", str(tmp_path / "r.safetensors"),
                 "--out", str(tmp_path / "x")]) == 1  # fmt: skip
    assert "hidden size 32" in capsys.readouterr().err
    assert main(["refusal", "orthogonalize", str(d / "model"), "--direction", str(tmp_path / "r.safetensors"),
                 "--out", str(d / "model" / "inside")]) == 1  # fmt: skip
    assert "source" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()
