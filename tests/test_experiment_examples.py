"""examples/mtp_comparison.py and examples/upcycle_experiment.py: every command they run names a
valid config that builds the model it claims (MTP or not; the upcycled MoE layouts), and their
reports read results as they are stored."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moeformer.config import load_config
from moeformer.models import build_model
from moeformer.moe import MoELayer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import mtp_comparison  # noqa: E402
import upcycle_experiment  # noqa: E402


def _config(cmd: list[str]):
    config_path = Path(cmd[cmd.index("train") + 1])
    overrides = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    return load_config(config_path, overrides)


@pytest.mark.parametrize("variant", list(mtp_comparison.VARIANTS))
def test_mtp_comparison_runs_differ_only_by_the_mtp_module(variant, tmp_path):
    cmd = mtp_comparison.command(variant, 1, 50, tmp_path, tmp_path / "run")
    config = _config(cmd)
    assert config.train.steps == 50 and config.train.seed == 1
    mtp = config.model.mtp
    if variant == "v3":
        assert mtp is None
    else:
        assert (mtp.depth, mtp.weight, mtp.late_weight) == (1, 0.3, 0.1)
    assert config.model.attention.kind == "mla" and config.model.moe.score == "sigmoid"


def test_mtp_comparison_report_pairs_seeds():
    def run(loss, ahead=None, decoding=None):
        r = {"test_loss": loss, "best_valid": loss, "wall_seconds": 60.0, "parameters": 10, "mtp_parameters": 0}
        if ahead is not None:
            r.update(valid_mtp_nll_1=ahead, decoding=decoding, mtp_parameters=3)
        return r

    speed = {f"batch{b}": {"acceptance": 0.5, "plain_tokens_per_s": 100.0, "speculative_tokens_per_s": 120.0,
                           "speedup": 1.2, "passes": 30} for b in (1, 8)}  # fmt: skip
    results = {"v3": {0: run(1.60), 1: run(1.62)}, "v3-mtp": {0: run(1.58, 2.1, speed), 1: run(1.63, 2.2, speed)}}
    text = "\n".join(mtp_comparison.report(results, [0, 1]))
    assert "-0.020, +0.010; MTP better in 1 of 2" in text
    assert "| batch 1 | 0.50 ± 0.00 | 100 | 120 | 1.20 ± 0.00x |" in text


@pytest.mark.parametrize("arm", list(upcycle_experiment.ARMS))
def test_upcycle_arms_build_the_layer_the_upcycled_checkpoint_holds(arm, tmp_path):
    start, kind, units = upcycle_experiment.ARMS[arm]
    sets = upcycle_experiment._common(tmp_path, 0, 40 * units) + upcycle_experiment._moe_sets(kind)
    config = load_config(upcycle_experiment.CONFIG, sets)
    assert config.train.steps == 40 * units
    model = build_model(config.model)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if kind is None:
        assert not layers
        return
    experts = layers[0].experts
    if kind == "topk":  # sparse upcycling: 8 copies of the whole FFN, top-2
        assert (experts.n_experts, experts.hidden, layers[0].router.top_k) == (8, upcycle_experiment.D_FF, 2)
    else:  # fine-grained: segments of d_ff / 4, one shared
        assert (experts.n_experts, experts.hidden, layers[0].router.top_k) == (31, upcycle_experiment.D_FF // 4, 7)
        assert layers[0].shared_experts is not None


def test_refusal_subject_report_states_the_targets_and_each_subjects_table():
    import refusal_subject

    results = {
        "data": {"dialogues": 9, "counts": {"harmful_train": 3}},
        "subjects": {
            "deepseek": {"refusal": {"jailbreakbench": 0.95, "harmless_test": 0.06, "harmful_train_sample": 0.9},
                         "chosen": {"position": -6, "layer": 2}, "table_md": "| baseline | 0.950 |",
                         "experts": {"md": "| mask 1 refusal experts | 0.060 | 0.950 |"},
                         "calibration": {"box": {"min_harmful": 0.93, "max_harmless": 0.03}, "chosen": "d-rho0.350",
                                         "validation_prompts": {"harmful": 180, "harmless": 600},
                                         "rounds": [{"rho": None, "harmful": 0.8, "harmless": 0.01, "run": "d"},
                                                    {"rho": 0.35, "harmful": 0.94, "harmless": 0.02,
                                                     "run": "d-rho0.350"}]}},
            "dense": {"refusal": {"jailbreakbench": 0.94, "harmless_test": 0.07, "harmful_train_sample": 0.96},
                      "direction": "none selected: no candidate"},
        },
    }  # fmt: skip
    text = refusal_subject.report_md(results)
    assert "| deepseek | 0.95 | 0.06 | 0.90 |" in text and "| dense | 0.94 | 0.07 | 0.96 |" in text
    assert "Direction: position -6, layer 2." in text and "| mask 1 refusal experts |" in text
    assert "none selected: no candidate" in text
    assert "180 harmful: the held-out pool and harmful_val; 600 harmless_val" in text
    assert "| as fine-tuned | 0.800 | 0.010 | d |" in text
    assert "| 0.350 | 0.940 | 0.020 | d-rho0.350 (chosen) |" in text


def test_refusal_subject_drops_prompts_that_leave_no_room_and_counts_them():
    import refusal_subject

    from moeformer.refusal.subject_data import SubjectData

    class Lm:
        prompt_format = staticmethod(lambda t: f"U: {t}\nA:")

        @staticmethod
        def encode(text, special_tokens=False):
            return text.split()

    subject = SubjectData(["a b", "a b c d e f g"], ["x"], [], [], ["short one"], ["y z"])
    sets, dropped = refusal_subject.fitting(Lm(), subject, limit=5)
    assert sets["harmful_train"] == ["a b"] and dropped["harmful_train"] == 1
    assert sets["harmful_eval"] == ["short one"] and dropped["harmful_eval"] == 0


def test_refusal_subject_harmless_scores_every_fitting_prompt_in_chunks(monkeypatch, tmp_path):
    import refusal_subject_harmless as harmless

    from moeformer.refusal.scoring import Completion
    from moeformer.refusal.subject_data import SubjectData

    class Lm:
        prompt_format = staticmethod(lambda t: t)
        model = type("M", (), {"config": type("C", (), {"max_seq_len": 20})()})()

        @staticmethod
        def encode(text, special_tokens=False):
            return text.split()

    prompts = [f"ask {i}" for i in range(7)] + ["too long " * 3]  # 6 words: over the 20 - 16 left
    calls = []

    def complete(lm, batch, max_new_tokens):
        calls.append(len(batch))
        return [Completion(p, "I'm sorry, I cannot" if p.endswith(("1", "4")) else "Sure: here") for p in batch]

    monkeypatch.setattr(harmless, "load_chat_lm", lambda run, template: Lm())
    monkeypatch.setattr(harmless, "complete", complete)
    subject = SubjectData([], [], [], [], [], prompts)
    scores = harmless.score_subject(tmp_path, subject, chunk=3)
    assert calls == [3, 3, 1] and scores["dropped_too_long"] == 1
    assert (scores["prompts"], scores["refused"]) == (7, 2) and abs(scores["rate"] - 2 / 7) < 1e-12
    assert abs(scores["standard_error"] - (2 / 7 * 5 / 7 / 7) ** 0.5) < 1e-12
    assert scores["first_200_rate"] == scores["rate"]  # fewer than 200 prompts: all of them


def test_refusal_candidates_scores_each_saved_direction_at_its_layer_and_draws_them(monkeypatch, tmp_path):
    import refusal_candidates as rc
    import torch
    from safetensors.torch import save_file

    from moeformer.refusal.evaluation import ConditionResult, EvalReport

    run = tmp_path / "dense-seed0"
    (run / "direction").mkdir(parents=True)
    directions = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (positions, layers, d)
    save_file({"directions": directions}, str(run / "direction" / "candidates.safetensors"))
    nan = float("nan")
    scores = [dict(position=p, layer=layer, bypass=nan if layer == 0 else 0.5, induce=0.1, kl=0.01,
                   discarded="zero difference of means" if layer == 0 else None if layer == 1 else "layer >= 2")
              for p in (-2, -1) for layer in range(3)]  # fmt: skip
    (run / "direction" / "scores.json").write_text(json.dumps(scores))
    (run / "direction" / "summary.json").write_text(json.dumps({"chosen": {"position": -1, "layer": 1}}))
    seen = []

    def evaluate(lm, r, layer, harmful, harmless, *, conditions, max_new_tokens, batch_size):
        seen.append((r.tolist(), layer, conditions))
        value = float(r[0]) / 100
        return EvalReport([ConditionResult("ablation", value, 0.0, 0.02, 1.0),
                           ConditionResult("actadd", 1.0, 1 - value, 0.3, 1.1)], layer)  # fmt: skip

    monkeypatch.setattr(rc, "evaluate", evaluate)
    result = rc.score_candidates(object(), run, ["h"], ["x"], new=4)
    assert result["n_layers"] == 3 and result["n_positions"] == 2
    assert [(r[1], r[2]) for r in seen] == [(1, ("ablation", "actadd")), (2, ("ablation", "actadd"))] * 2
    assert [r[0] for r in seen] == [directions[i, j].tolist() for i in (0, 1) for j in (1, 2)]  # layer 0 skipped
    rows = {(c["position"], c["layer"]): c for c in result["candidates"]}
    assert rows[(-1, 1)]["chosen"] and not rows[(-2, 1)]["chosen"]
    assert rows[(-1, 2)]["ablation_harmful_refusal"] == pytest.approx(directions[1, 2, 0].item() / 100)
    assert rows[(-1, 2)]["actadd_harmless_refusal"] == pytest.approx(1 - directions[1, 2, 0].item() / 100)
    text = "\n".join(rc.table("dense", result))
    assert "| -1 | 1 | 0.50 | 0.10 | 0.010 | **chosen** | 0.16 | 0.84 |" in text
    assert "| -2 | 2 | 0.50 | 0.10 | 0.010 | layer >= 2 |" in text
    assert "| -2 | 1 | 0.50 | 0.10 | 0.010 | passes |" in text
    (run / "direction" / "summary.json").write_text(json.dumps({"chosen": None}))  # every candidate filtered out
    assert not any(c["chosen"] for c in rc.score_candidates(object(), run, ["h"], ["x"], new=4)["candidates"])
    rc.plot({"dense": result, "deepseek": result}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_validation_rates_are_measured_once_per_prompt_set(monkeypatch, tmp_path):
    import refusal_subject

    measured = []
    monkeypatch.setattr(refusal_subject, "load_chat_lm", lambda run, template: object())
    monkeypatch.setattr(refusal_subject, "refusal_rate", lambda lm, prompts, new: measured.append(len(prompts)) or 0.25)
    first = refusal_subject.validation_rates(tmp_path, ["h"] * 3, ["s"] * 5, 16, 0.3)
    assert refusal_subject.validation_rates(tmp_path, ["h"] * 3, ["s"] * 5, 16, 0.3) == first
    assert measured == [3, 5]  # the second call read the run's record
    refusal_subject.validation_rates(tmp_path, ["h"] * 3, ["s"] * 6, 16, 0.3)  # other prompts: measured again
    assert measured == [3, 5, 3, 6] and first.harmful == first.harmless == 0.25 and first.run == tmp_path.name


def test_refusal_subject_runs_are_those_results_json_names(tmp_path):
    import refusal_subject

    assert refusal_subject.subject_runs(tmp_path, ["dense"], 1) == {"dense": tmp_path / "dense-seed1"}
    (tmp_path / "results.json").write_text(json.dumps({"subjects": {"dense": {"run": "dense-seed1-rho0.225"}}}))
    found = refusal_subject.subject_runs(tmp_path, ["dense", "deepseek"], 1)
    assert found == {"dense": tmp_path / "dense-seed1-rho0.225", "deepseek": tmp_path / "deepseek-seed1"}
    cut = {"subjects": {"deepseek-cut1": {"run": "deepseek-seed1-rho0.350"}}}  # --max-layer-fraction 1.0 only
    (tmp_path / "results.json").write_text(json.dumps(cut))
    assert refusal_subject.subject_runs(tmp_path, ["deepseek"], 1) == {"deepseek": tmp_path / "deepseek-seed1-rho0.350"}


def test_refusal_separation_compares_with_the_scores_recorded_for_that_run():
    import refusal_separation as rs

    old = {"dense": {"refusal": {"jailbreakbench": 0.9}}}  # before calibration: no "run"
    assert rs.recorded_refusal(old, "dense-seed2") == {"jailbreakbench": 0.9}
    kept = {"deepseek-cut1": {"run": "deepseek-seed0-rho0.537", "refusal": {"jailbreakbench": 0.94}}}
    assert rs.recorded_refusal(kept, "deepseek-seed0-rho0.537") == {"jailbreakbench": 0.94}
    assert rs.recorded_refusal(kept, "deepseek-seed0") is None  # the subject before calibration: not scored


def test_refusal_separation_summarises_the_roc_against_the_targets(tmp_path):
    import refusal_separation as rs
    import torch

    harmful = torch.arange(1.0, 21.0)  # 20 positives: 1 .. 20
    harmless = torch.cat([torch.arange(-99.0, 0.0), torch.tensor([1.5])])  # 100 negatives, one above 1
    r = rs.separation(harmful, harmless)
    assert r["auc"] == pytest.approx(1 - 1 / (20 * 100))  # only the pair (1, 1.5) is out of order
    assert r["harmful_refused_at_0"] == 1.0 and r["harmless_refused_at_0"] == pytest.approx(0.01)
    assert r["harmful_refused_at_5pct_harmless"] == 1.0  # the 95th percentile of harmless is below 0
    assert r["harmless_refused_at_90pct_harmful"] == 0.0  # refusing 90% of harmful: a threshold of 2.9
    assert r["roc"][0] == pytest.approx([0.0, 0.05]) and r["roc"][-1] == [1.0, 1.0]
    margin = rs.first_token_margin(torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 0.5]]), [1, 2])
    assert margin.tolist() == [3.0, -1.0]  # refusal ids 1, 2 against the best other token (id 0)
    rs.plot({"a": r, "b": r}, tmp_path / "s.png", "first-token refusal margin")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_refusal_subject_refuses_to_reuse_runs_trained_with_other_refusal_openers(tmp_path):
    import argparse

    import refusal_subject

    parser, default, one = argparse.ArgumentParser(), list(refusal_subject.REFUSAL_OPENERS), ["I'm sorry, but "]
    for name in "abc":
        (tmp_path / name).mkdir()
    refusal_subject.check_train_openers(tmp_path / "a", default, parser)
    refusal_subject.check_train_openers(tmp_path / "a", default, parser)  # the same again: fine
    with pytest.raises(SystemExit):
        refusal_subject.check_train_openers(tmp_path / "a", one, parser)
    (tmp_path / "b" / "chat.txt").write_text("dialogues of a run from before the record\n")
    with pytest.raises(SystemExit):
        refusal_subject.check_train_openers(tmp_path / "b", one, parser)
    refusal_subject.check_train_openers(tmp_path / "c", one, parser)
    assert json.loads((tmp_path / "c" / "train_openers.json").read_text()) == one
