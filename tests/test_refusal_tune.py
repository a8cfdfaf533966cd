"""`refusal tune`: a seeded, resumable Optuna search of the edit's strength kernel under a KL budget,
whose stored scores are what the edited weights give."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("optuna")
from refusal_models import PLANTED_HARMFUL, PLANTED_HARMLESS, planted_llama  # noqa: E402

from moeformer.cli import main  # noqa: E402
from moeformer.refusal.extract import ExtractOptions, extract, load_direction, save_extraction  # noqa: E402
from moeformer.refusal.lm import RefusalError  # noqa: E402
from moeformer.refusal.openers import RefusalOpeners, refusal_token_ids  # noqa: E402
from moeformer.refusal.orthogonalize import orthogonalize_weights  # noqa: E402
from moeformer.refusal.selection import kl_divergence, last_logits, refusal_metric  # noqa: E402
from moeformer.refusal.tune import TuneOptions, tune  # noqa: E402

HARMFUL_VAL, HARMLESS_VAL = PLANTED_HARMFUL[-12:], PLANTED_HARMLESS[-12:]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune")
    lm, _ = planted_llama()
    options = ExtractOptions(n_train=40, n_val=12, refusal_tokens=["sorry"])
    result = extract(lm, PLANTED_HARMFUL[:60], PLANTED_HARMLESS[:60], HARMFUL_VAL, HARMLESS_VAL, options)
    save_extraction(result, path / "extract", plot=False)
    lm.model.save_pretrained(path / "model")
    lm.tokenizer.save_pretrained(path / "model")
    return path


def test_the_search_scores_what_the_edit_computes_and_resumes(planted, tmp_path, single_thread):
    lm, _ = planted_llama()
    ids = refusal_token_ids(lm, ["sorry"])
    openers = RefusalOpeners.first_tokens(ids)
    options = TuneOptions(trials=5, kl_budget=0.5, seed=3)
    first = tune(lm, planted / "extract", HARMFUL_VAL, HARMLESS_VAL, openers, tmp_path / "search", options)
    assert len(first.trials) == 5
    again = tune(lm, planted / "extract", HARMFUL_VAL, HARMLESS_VAL, openers, tmp_path / "search",
                 TuneOptions(trials=7, kl_budget=0.5, seed=3))  # fmt: skip
    assert len(again.trials) == 7 and [t["number"] for t in again.trials[:5]] == [t["number"] for t in first.trials]
    assert again.trials[:5] == first.trials  # the first five were not run again
    for t in again.pareto:  # nothing dominates a front member
        assert not any(o["bypass"] < t["bypass"] and o["kl"] < t["kl"] for o in again.trials)
    best = again.best
    assert best is not None and best["kl"] <= 0.5
    assert best["bypass"] == min(t["bypass"] for t in again.trials if t["kl"] <= 0.5)

    base_harmless = last_logits(lm, HARMLESS_VAL)
    r, layer = load_direction(tmp_path / "search")
    assert layer == best["params"]["direction_layer"]
    orthogonalize_weights(lm, r, kernel=again.kernel())
    bypass = float(refusal_metric(last_logits(lm, HARMFUL_VAL), ids).mean())
    kl = float(kl_divergence(base_harmless, last_logits(lm, HARMLESS_VAL)).mean())
    assert bypass == pytest.approx(best["bypass"], abs=1e-4) and kl == pytest.approx(best["kl"], abs=1e-4)
    files = sorted(p.name for p in (tmp_path / "search").iterdir())
    assert files == ["direction.safetensors", "pareto.md", "pareto.png", "settings.json", "study.db", "tune.json"]
    assert json.loads((tmp_path / "search" / "tune.json").read_text())["best"]["number"] == best["number"]


def test_a_search_with_other_settings_or_a_foreign_folder_is_refused(planted, tmp_path, single_thread):
    lm, _ = planted_llama()
    ids = RefusalOpeners.first_tokens(refusal_token_ids(lm, ["sorry"]))
    tune(lm, planted / "extract", HARMFUL_VAL, HARMLESS_VAL, ids, tmp_path / "s", TuneOptions(trials=2))
    with pytest.raises(RefusalError, match="holds a search with other settings \\(options differ\\)"):
        tune(lm, planted / "extract", HARMFUL_VAL, HARMLESS_VAL, ids, tmp_path / "s", TuneOptions(trials=2, seed=9))
    other = RefusalOpeners.first_tokens(refusal_token_ids(lm, ["I"]))  # another metric: not the same search
    with pytest.raises(RefusalError, match="other settings \\(refusal_openers differ\\)"):
        tune(lm, planted / "extract", HARMFUL_VAL, HARMLESS_VAL, other, tmp_path / "s", TuneOptions(trials=2))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="is not a search of `refusal tune`"):
        tune(lm, planted / "extract", HARMFUL_VAL, HARMLESS_VAL, ids, tmp_path / "mine", TuneOptions(trials=2))
    with pytest.raises(RefusalError, match="KL budget must be > 0"):
        TuneOptions(kl_budget=0)


def test_tune_from_the_command_line(planted, tmp_path, capsys):
    d = planted
    (tmp_path / "harmful.json").write_text(json.dumps(PLANTED_HARMFUL))
    (tmp_path / "harmless.json").write_text(json.dumps(PLANTED_HARMLESS))
    rc = main(["refusal", "tune", str(d / "model"), "--direction", str(d / "extract"), "--harmful",
               str(tmp_path / "harmful.json"), "--harmless", str(tmp_path / "harmless.json"), "--out",
               str(tmp_path / "search"), "--trials", "4", "--kl-budget", "10", "--n-val", "8",
               "--refusal-tokens", "sorry", "--quiet", "--search-layer"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "Pareto front (bypass vs KL)" in printed and "apply it with:" in printed
    command = printed.split("apply it with:\n")[1].split("\n")[0].split()
    assert command[:4] == ["moeformer", "refusal", "orthogonalize", str(d / "model")]
    edited = tmp_path / "edited"
    assert main([*command[1:-1], str(edited)]) == 0  # the printed command runs as printed
    assert (edited / "config.json").is_file()
