"""`moeformer refusal extract / eval / orthogonalize` end to end on saved tiny models, and bad input."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from moeformer.cli import main
from moeformer.refusal.extract import load_direction
from moeformer.refusal.interventions import ablate
from moeformer.refusal.loading import load_chat_lm
from moeformer.refusal.streaming import checkpoint_shards

transformers = pytest.importorskip("transformers")
from refusal_models import (  # noqa: E402
    PLANTED_HARMFUL,
    PLANTED_HARMLESS,
    hf_model,
    native_chat_lm,
    planted_llama,
    save_hf,
)


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
    positions = ((~batch.padding_mask).long().cumsum(-1) - 1).clamp(min=0)
    got = reloaded(input_ids=batch.ids, attention_mask=(~batch.padding_mask).long(), position_ids=positions).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert main(["refusal", "orthogonalize", str(d / "model"), "--direction", str(tmp_path / "dir"),
                 "--out", str(out)]) == 1  # fmt: skip
    assert "already exists" in capsys.readouterr().err


def test_orthogonalize_a_moeformer_checkpoint(tmp_path):
    lm = native_chat_lm()
    lm.save(tmp_path / "ckpt")
    r = torch.randn(lm.d_model)
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
        (["--harmful", str(d / "harmful.json"), "--harmless", str(d / "harmless.txt"), "--refusal-tokens", "I",
          "--refusal-openers", "I cannot"], str(no_weights), "not both"),
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


def _guarded_outputs(tmp_path, monkeypatch):
    """(--out value, what must survive, expected message) for outputs --force may not replace."""
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("four years of work\n")
    (tmp_path / "cwd").mkdir()
    regular = tmp_path / "cwd" / "notes.txt"
    regular.write_text("keep me\n")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "run.json").write_text("{}\n")
    monkeypatch.chdir(tmp_path / "cwd")
    return [
        (str(foreign), foreign / "thesis.txt", "does not look like a directory this tool wrote"),
        (".", regular, "working directory"),
        (str(regular), regular, "not a directory"),
    ], run


def test_force_never_replaces_a_foreign_directory_the_cwd_or_a_file(planted_dir, tmp_path, monkeypatch, capsys):
    """Refused before the model is read: the model's weights are garbage, reading them would fail otherwise."""
    d = planted_dir
    model = save_hf("llama", tmp_path / "broken", chat_template=False)
    for f in model.glob("*.safetensors"):
        f.write_bytes(b"not weights")
    import safetensors.torch

    safetensors.torch.save_file({"direction": torch.ones(32)}, str(tmp_path / "r.safetensors"))
    files = ["--harmful", str(d / "harmful.json"), "--harmless", str(d / "harmless.txt"), "--quiet"]
    commands = {
        "extract": ["refusal", "extract", str(model), *files],
        "eval": ["refusal", "eval", str(model), *files, "--direction", str(tmp_path / "r.safetensors")],
        "orthogonalize": ["refusal", "orthogonalize", str(model), "--direction", str(tmp_path / "r.safetensors")],
    }
    cases, run = _guarded_outputs(tmp_path, monkeypatch)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for name, argv in commands.items():
        for out, survivor, message in cases:
            assert main([*argv, "--out", out, "--force"]) in (1, 2), (name, out)
            err = capsys.readouterr().err
            assert message in err and "moeformer: error" in err, (name, out, err)
            assert survivor.read_text().endswith("\n")
        assert main([*argv, "--out", str(model), "--force"]) in (1, 2)  # replacing it would delete the model
        assert "source" in capsys.readouterr().err
        if name != "orthogonalize":  # results never replace a run; a new model may replace an old one
            assert main([*argv, "--out", str(run), "--force"]) in (1, 2)
            assert "holds a model or a training run" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_interrupted_write_keeps_the_old_output_and_leaves_no_temporary(planted_dir, tmp_path, monkeypatch):
    from moeformer.publish import MARKER
    from moeformer.refusal import plots
    from moeformer.refusal.evaluation import ConditionResult, EvalReport, save_evaluation

    report = EvalReport([ConditionResult("baseline", 1.0, 0.0, 0.0, 2.0)], layer=1)
    out = tmp_path / "eval"
    assert save_evaluation(report, out) == ["eval.json", "eval.md"] and (out / MARKER).is_file()
    old = (out / "eval.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_routing", interrupted)
    routing = [{"layer": 0, "harmful": [1.0], "harmless": [0.0], "harmful_ablated": [1.0]}]
    bigger = EvalReport([*report.results, ConditionResult("ablation", 0.0, 0.0, 0.1, 2.1)], layer=1)
    with pytest.raises(KeyboardInterrupt):
        save_evaluation(bigger, out, routing=routing, force=True)
    assert (out / "eval.json").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no .eval.tmp-* or .eval.old-* left


def test_every_refusal_and_inspect_option_has_help_showing_its_default():
    """tests/test_cli.py's walk, over the subcommands cli_refusal.py and cli_inspect.py define."""
    from test_cli import options_without_help_or_default, subparsers

    from moeformer.cli import build_parser

    checked = [(path, options_without_help_or_default(sub)) for path, sub in subparsers(build_parser())
               if path[0] in ("refusal", "inspect", "report")]  # fmt: skip
    assert len(checked) == 11 and all(bad == [] for _, bad in checked), checked


def test_orthogonalize_stream_writes_the_same_model_without_loading_it(tmp_path, capsys):
    """--stream: shard by shard, no model built; the files equal the in-memory command's."""
    source = tmp_path / "model"
    model, tok = hf_model("mixtral")
    model.save_pretrained(source, max_shard_size="20KB")
    tok.save_pretrained(source)
    safetensors.torch.save_file({"direction": torch.randn(32)}, str(tmp_path / "r.safetensors"))
    args = ["refusal", "orthogonalize", str(source), "--direction", str(tmp_path / "r.safetensors")]
    assert main([*args, "--out", str(tmp_path / "streamed"), "--stream", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"in {len(checkpoint_shards(source)[0])} shards, one at a time" in printed
    assert "the residual-stream check did not run" in printed
    assert main([*args, "--out", str(tmp_path / "in-memory"), "--template", "{instruction}"]) == 0

    streamed, in_memory = _all_tensors(tmp_path / "streamed"), _all_tensors(tmp_path / "in-memory")
    assert set(streamed) == set(in_memory)
    assert all(torch.equal(streamed[n], in_memory[n]) for n in streamed)
    assert main([*args, "--out", str(tmp_path / "streamed"), "--stream", "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_extract_by_hand_checks_the_choice_before_any_forward_pass(planted_dir, tmp_path, capsys):
    d = planted_dir
    base = ["refusal", "extract", str(d / "model"), "--harmful", str(d / "harmful.json"), "--harmless",
            str(d / "harmless.txt"), "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main([*base, "--layer", "1"]) == 1
    assert "needs both layer and position (--layer L --position P)" in capsys.readouterr().err
    assert main([*base, "--layer", "9", "--position", "-1"]) == 1
    assert "--layer 9: the model has 3 layers, so layers are 0 to 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_orthogonalize_method_and_kernel_from_the_command_line(tmp_path, capsys):
    """--method projected reads the harmless mean from the extract directory; --kernel sets the strengths;
    the streamed and in-memory commands write the same tensors."""
    from moeformer.refusal.edits import StrengthKernel
    from moeformer.refusal.orthogonalize import orthogonalize_weights

    model, tok = hf_model("qwen2_moe")
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    tok.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    direction, means = torch.randn(32, generator=g), torch.randn(2, 3, 32, generator=g)
    (tmp_path / "ex").mkdir()
    safetensors.torch.save_file({"direction": direction}, str(tmp_path / "ex" / "direction.safetensors"),
                                metadata={"position": "-1", "layer": "2"})  # fmt: skip
    safetensors.torch.save_file({"directions": means.clone(), "harmful_mean": means.clone(), "harmless_mean": means},
                                str(tmp_path / "ex" / "candidates.safetensors"))  # fmt: skip
    args = ["refusal", "orthogonalize", str(tmp_path / "model"), "--direction", str(tmp_path / "ex"),
            "--method", "projected", "--kernel", "peak_layer=1", "width=2", "minimum=0.5"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "orthogonalized (projected)" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "b"), "--stream", "--quiet"]) == 0
    a, b = _all_tensors(tmp_path / "a"), _all_tensors(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    lm = load_chat_lm(tmp_path / "model")
    orthogonalize_weights(lm, direction, method="projected", harmless_mean=means[-1, 2],
                          kernel=StrengthKernel(peak_layer=1, width=2, minimum=0.5))  # fmt: skip
    state = lm.model.state_dict()
    assert all(torch.equal(state[n], a[n]) for n in state if n in a)  # the command = the Python call, to the bit

    assert main([*args[:5], "--direction", str(tmp_path / "ex" / "direction.safetensors"), "--method", "projected",
                 "--out", str(tmp_path / "c")]) == 1  # fmt: skip
    assert "a direction file alone does not hold it" in capsys.readouterr().err
    assert main([*args[:5], "--kernel", "peak_layer=1", "sharpness=3", "--out", str(tmp_path / "c")]) == 1
    expected = "--kernel takes KEY=VALUE with keys peak_layer, width, peak, minimum; got sharpness"
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _all_tensors(path):
    out = {}
    for shard in checkpoint_shards(path)[0]:
        with safe_open(str(path / shard), "pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


def test_orthogonalize_as_lora_writes_an_adapter_equal_to_the_full_edit(planted_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    d = planted_dir
    args = ["refusal", "orthogonalize", str(d / "model"), "--direction", str(tmp_path / "r.safetensors")]
    safetensors.torch.save_file({"direction": torch.randn(32)}, str(tmp_path / "r.safetensors"))
    assert main([*args, "--out", str(tmp_path / "adapter"), "--as-lora"]) == 0
    assert "a PEFT LoRA adapter, rank 1" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    lm = load_chat_lm(d / "model")
    batch = lm.batch(PLANTED_HARMFUL[:3])
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(d / "model"),
                                             tmp_path / "adapter").eval()  # fmt: skip
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    real = (~batch.padding_mask).long()
    with torch.no_grad():
        got, expected = (m(input_ids=batch.ids, attention_mask=real).logits for m in (adapted, full))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert main([*args, "--out", str(tmp_path / "x"), "--as-lora", "--stream"]) == 1
    assert "--stream and --as-lora are exclusive" in capsys.readouterr().err
