"""Extraction and selection: a planted direction is found, chosen, saved and loaded back."""

from __future__ import annotations

import json

import pytest
import torch

from moeformer.publish import MARKER, OutputExistsError
from moeformer.refusal.directions import candidate_directions
from moeformer.refusal.extract import ExtractOptions, extract, load_direction, save_extraction
from moeformer.refusal.lm import RefusalError
from moeformer.refusal.selection import CandidateScore, filter_and_choose, refusal_metric

pytest.importorskip("transformers")
from refusal_models import PLANTED_HARMFUL, PLANTED_HARMLESS, planted_llama  # noqa: E402


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_planted_direction_is_recovered(single_thread):
    lm, v = planted_llama()
    cands = candidate_directions(lm, PLANTED_HARMFUL, PLANTED_HARMLESS, batch_size=40)
    assert cands.directions.shape == (lm.n_eoi, 3, lm.d_model) and lm.n_eoi == 2
    assert cands.directions[:, 0].norm() < 1e-5  # layer 0's input at the eoi tokens: the same template tokens
    for pos in range(lm.n_eoi):
        for layer in (1, 2):
            assert _cos(cands.directions[pos, layer], v) > 0.99


def test_streaming_means_do_not_depend_on_the_batch_size(single_thread):
    lm, _ = planted_llama()
    a = candidate_directions(lm, PLANTED_HARMFUL[:30], PLANTED_HARMLESS[:30], batch_size=7)
    b = candidate_directions(lm, PLANTED_HARMFUL[:30], PLANTED_HARMLESS[:30], batch_size=30)
    torch.testing.assert_close(a.directions, b.directions, atol=1e-5, rtol=0)


def test_extract_chooses_the_planted_direction_and_saves_it(tmp_path, single_thread):
    lm, v = planted_llama()
    options = ExtractOptions(n_train=60, n_val=16, batch_size=32, refusal_tokens=["sorry"])
    result = extract(lm, PLANTED_HARMFUL, PLANTED_HARMLESS, PLANTED_HARMFUL, PLANTED_HARMLESS, options)
    chosen = result.selection.chosen
    assert chosen.layer == 1 and chosen.discarded is None  # layer 2 >= 80% of 3 layers is filtered
    assert _cos(result.selection.direction, v) > 0.99
    assert chosen.bypass < 0 < chosen.induce and chosen.kl <= 0.1
    assert result.selection.baseline_harmful > 0 > result.selection.baseline_harmless
    assert all(s.discarded for s in result.selection.scores if s.layer == 2)

    out = save_extraction(result, tmp_path / "dir")
    names = sorted(p.name for p in out.iterdir())
    assert names == [MARKER, "candidates.safetensors", "direction.safetensors", "scores.json", "scores.png",
                     "summary.json"]  # fmt: skip
    direction, layer = load_direction(out)
    torch.testing.assert_close(direction, result.selection.direction)
    assert layer == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen"]["layer"] == 1 and 50 <= summary["counts"]["harmful_train"] <= 60  # filtered
    assert len(json.loads((out / "scores.json").read_text())) == 2 * 3
    with pytest.raises(OutputExistsError, match="already exists"):
        save_extraction(result, out)
    save_extraction(result, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == names and not list(tmp_path.glob(".dir.*"))


def test_refusal_metric_is_the_log_odds():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    torch.testing.assert_close(refusal_metric(logits, [0, 1]), torch.tensor([0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(refusal_metric(logits, [2]), torch.tensor([0.0]), atol=1e-5, rtol=0)
    expected = torch.log(torch.tensor(0.2 / 0.8))
    torch.testing.assert_close(refusal_metric(logits, [0]), expected[None], atol=1e-5, rtol=0)


def test_filters_follow_the_paper():
    scores = [
        CandidateScore(-1, 0, bypass=-5.0, induce=-1.0, kl=0.01),  # induce <= 0
        CandidateScore(-1, 1, bypass=-4.0, induce=2.0, kl=0.5),  # kl too large
        CandidateScore(-1, 2, bypass=-3.0, induce=2.0, kl=0.05),  # kept
        CandidateScore(-2, 3, bypass=-2.0, induce=2.0, kl=0.05),  # kept, worse bypass
        CandidateScore(-1, 8, bypass=-9.0, induce=2.0, kl=0.01),  # beyond 80% of 10 layers
    ]
    chosen = filter_and_choose(scores, 10)
    assert (chosen.position, chosen.layer) == (-1, 2)
    assert [s.discarded is None for s in scores] == [False, False, True, True, False]
    assert "induce" in scores[0].discarded and "kl" in scores[1].discarded and "layer" in scores[4].discarded
    with pytest.raises(RefusalError, match="filtered out"):
        filter_and_choose([CandidateScore(-1, 0, -1.0, -1.0, 0.0)], 10)


def test_bad_options_and_files_are_refused(tmp_path):
    with pytest.raises(RefusalError, match="n_train"):
        ExtractOptions(n_train=0)
    with pytest.raises(RefusalError, match="kl_threshold"):
        ExtractOptions(kl_threshold=0)
    with pytest.raises(RefusalError, match="no direction file"):
        load_direction(tmp_path)
    (tmp_path / "d.safetensors").write_bytes(b"garbage")
    with pytest.raises(RefusalError, match="unreadable"):
        load_direction(tmp_path / "d.safetensors")


def test_a_candidate_chosen_by_hand_is_taken_unfiltered_and_alone_scored(tmp_path, single_thread):
    """Layer 2 is beyond the paper's 80% cutoff of 3 layers: by hand it is still taken."""
    lm, v = planted_llama()
    options = ExtractOptions(n_train=60, n_val=16, refusal_tokens=["sorry"], layer=2, position=-1)
    result = extract(lm, PLANTED_HARMFUL, PLANTED_HARMLESS, PLANTED_HARMFUL, PLANTED_HARMLESS, options)
    s = result.selection
    assert s.chosen_by == "hand" and (s.chosen.position, s.chosen.layer) == (-1, 2)
    assert len(s.scores) == 1 and s.chosen.discarded is None
    torch.testing.assert_close(s.direction, result.candidates.directions[-1, 2])
    out = save_extraction(result, tmp_path / "dir")
    assert load_direction(out)[1] == 2
    assert json.loads((out / "summary.json").read_text())["chosen_by"] == "hand"


@pytest.mark.parametrize(
    "layer, position, match",
    [(3, -1, r"--layer 3: the model has 3 layers, so layers are 0 to 2"),
     (0, 0, r"--position 0: the template has \d+ tokens after the instruction, so positions are -\d+ to -1"),
     (0, None, "needs both layer and position")],
)  # fmt: skip
def test_a_bad_hand_choice_fails_before_any_forward_pass(layer, position, match, monkeypatch):
    lm, _ = planted_llama()
    monkeypatch.setattr(lm, "forward_logits", lambda *a, **k: pytest.fail("ran the model"))
    with pytest.raises(RefusalError, match=match):
        options = ExtractOptions(n_train=4, n_val=2, refusal_tokens=["sorry"], layer=layer, position=position)
        extract(lm, PLANTED_HARMFUL, PLANTED_HARMLESS, PLANTED_HARMFUL, PLANTED_HARMLESS, options)


def test_when_every_candidate_is_filtered_the_scores_are_still_written(tmp_path, single_thread):
    from moeformer.refusal.run import InstructionFiles, ModelSource, run_extract

    lm, _ = planted_llama()
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "harmful.json").write_text(json.dumps(PLANTED_HARMFUL))
    (tmp_path / "harmless.json").write_text(json.dumps(PLANTED_HARMLESS))
    files = InstructionFiles(harmful=tmp_path / "harmful.json", harmless=tmp_path / "harmless.json")
    options = ExtractOptions(n_train=40, n_val=16, refusal_tokens=["sorry"], kl_threshold=1e-12)  # nothing passes
    with pytest.raises(RefusalError) as err:
        run_extract(ModelSource(path=tmp_path / "model"), files, tmp_path / "out", options)
    message = str(err.value)
    assert "every one of the 6 candidate directions was filtered out" in message
    assert "run extract again with --layer L --position P" in message
    assert "the lowest bypass score below the layer cutoff is position -" in message
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [MARKER, "candidates.safetensors", "scores.json", "scores.png", "summary.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["chosen"] is None and summary["direction_norm"] is None
    assert all(row["discarded"] for row in json.loads((tmp_path / "out" / "scores.json").read_text()))
