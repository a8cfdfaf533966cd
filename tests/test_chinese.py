"""Chinese text (issue 20): full-width punctuation kept, one script by OpenCC, in data, config and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeformer.config import ConfigError, config_from_dict, load_config
from moeformer.data.chinese import convert_pairs, convert_script, fullwidth_after_cjk, nfkc_keeping_punctuation
from moeformer.data.cleaning import CleaningConfig, clean_text
from moeformer.data.config import DataConfig
from moeformer.evaluate.checkpoint import _cleaning
from moeformer.evaluate.metrics import translation_scores
from moeformer.train import pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("你好吗？", "你好吗？"),  # NFKC would give "你好吗?"
        ("你好吗?", "你好吗？"),  # ASCII after a CJK character: full width
        ("車站在哪裡 ?", "車站在哪裡？"),  # the space before the mark goes; the script is untouched
        ("你好 , 我是汤姆。", "你好，我是汤姆。"),
        ("等等!", "等等！"),
        ("注意:小心;", "注意：小心；"),
        ("你好?!", "你好？！"),
        ("我(他)去。", "我（他）去。"),  # parentheses around CJK text
        ("我喜欢Tom, 他呢?", "我喜欢Tom, 他呢？"),  # after a Latin letter the comma stays ASCII
        ("谁是你最喜爱的 DJ ?", "谁是你最喜爱的 DJ ?"),
        ("它花了10,000日元。", "它花了10,000日元。"),  # a thousands separator between digits stays
        ("他说“好”?", "他说“好”？"),  # curly quotes are left as they are and count as CJK
        ("ＡＢＣ１２３\u3000好％", "ABC123 好%"),  # full-width letters, digits, %, ideographic space: NFKC
        ("等一下……", "等一下……"),  # NFKC would make the ellipsis "......"
        ("Are you OK?", "Are you OK?"),
    ],
)
def test_chinese_cleaning_keeps_fullwidth_punctuation(raw, expected):
    """clean_text(chinese=True): NFKC except Chinese punctuation; ASCII marks after CJK made full-width."""
    assert clean_text(raw, chinese=True) == expected


def test_english_side_is_normalised_as_before():
    """Without chinese=True, NFKC folds full-width forms as it always did."""
    assert clean_text("ｆｕｌｌ？ 你好吗？") == "full? 你好吗?"


def test_protected_nfkc_and_fullwidth_marks_are_separate_steps():
    """nfkc_keeping_punctuation only protects; fullwidth_after_cjk only converts ASCII marks."""
    assert nfkc_keeping_punctuation("你好吗？ＯＫ?") == "你好吗？OK?"
    assert fullwidth_after_cjk("好?OK?") == "好？OK?"


@pytest.mark.parametrize(
    ("text", "script", "expected"),
    [
        ("我愛你。", "simplified", "我爱你。"),
        ("車站在哪裡？", "simplified", "车站在哪里？"),
        ("你能幫我嗎？", "simplified", "你能帮我吗？"),
        ("乾燥", "simplified", "干燥"),
        ("乾隆", "simplified", "乾隆"),  # phrase-level: the emperor's name keeps 乾 (a character table would not)
        ("头发", "traditional", "頭髮"),  # 发 is 髮 in "hair" ...
        ("发现", "traditional", "發現"),  # ... and 發 in "discover"
        ("我爱你。", "simplified", "我爱你。"),  # already simplified: unchanged
        ("我愛你。", "keep", "我愛你。"),
        ("Are you OK?", "simplified", "Are you OK?"),
    ],
)
def test_convert_script_with_opencc(text, script, expected):
    """OpenCC t2s / s2t, phrase by phrase; "keep" and non-Chinese text pass through."""
    assert convert_script(text, script) == expected


def test_convert_script_names_the_allowed_scripts():
    with pytest.raises(ValueError, match="'simplified', 'traditional', 'keep'"):
        convert_script("我愛你", "hans")  # type: ignore[arg-type]


def test_convert_pairs_converts_the_chinese_sides_only():
    pairs = [("我愛你。", "我愛你。")]
    assert convert_pairs(pairs, "simplified", "target") == [("我愛你。", "我爱你。")]
    assert convert_pairs(pairs, "simplified", "source") == [("我爱你。", "我愛你。")]
    assert convert_pairs(pairs, "simplified", "both") == [("我爱你。", "我爱你。")]
    assert convert_pairs(pairs, "keep", "both") == pairs


def test_traditional_reference_is_converted_and_keeps_its_question_mark():
    """The issue's example: a traditional reference with ASCII "?" becomes simplified with "？"."""
    assert convert_script(clean_text("車站在哪裡?", chinese=True), "simplified") == "车站在哪里？"


# --- config ---


def test_zh_script_default_and_sides():
    """Default "keep" (no conversion, as before); the Chinese side comes from source_lang / target_lang."""
    assert DataConfig().zh_script == "keep"
    assert DataConfig().chinese_sides == "target"
    assert DataConfig(source_lang="zh-TW", target_lang="en").chinese_sides == "source"
    assert DataConfig(source_lang="zh", target_lang="zh").chinese_sides == "both"
    assert DataConfig(source_lang="en", target_lang="de").chinese_sides == "none"
    assert DataConfig(zh_script="traditional").zh_script == "traditional"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"zh_script": "hans"}, "data.zh_script: expected one of 'simplified', 'traditional', 'keep', got 'hans'"),
        ({"zh_script": "simplified", "target_lang": "de"}, "neither source_lang .* nor target_lang .* is Chinese"),
        ({"zh_script": "simplified", "corpus": "text", "path": "x"}, "corpus 'text' needs 'keep'"),
    ],
)
def test_zh_script_validation(data, match):
    """An unknown script, or a script with no Chinese side to convert, is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": {"preset": "transformer-tiny", "vocab_size": 10}, "data": data})


def test_english_only_data_may_keep():
    table = {"model": {"preset": "transformer-tiny", "vocab_size": 10}, "data": {"target_lang": "de"}}
    assert config_from_dict(table).data.zh_script == "keep"


@pytest.mark.parametrize("model", ["dense", "topk", "deepseek"])
def test_tatoeba_configs_use_simplified(model):
    assert load_config(CONFIGS / f"tatoeba-en-zh-{model}.toml").data.zh_script == "simplified"


# --- the pipeline ---


def test_pipeline_converts_training_text_and_keeps_test_references(tmp_path, monkeypatch):
    """Train/valid targets are simplified with "？"; test references keep their script (scored both ways)."""
    pairs = [(f"Sentence {i}?", f"第{i}句：{'車站在哪裡' if i % 2 else '我爱你'}?") for i in range(120)]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    seen = []
    real = pipeline.train_tokenizer_pair
    monkeypatch.setattr(pipeline, "train_tokenizer_pair", lambda p, **kw: seen.append(list(p)) or real(p, **kw))
    table = {"corpus": "tsv", "path": str(path), "valid_size": 10, "test_size": 10, "zh_script": "simplified"}
    config = config_from_dict({"model": {"preset": "transformer-tiny", "vocab_size": 10}, "data": table})
    prepared = pipeline.prepare(config)
    train_targets = [t for _, t in seen[0]]
    assert all(t.endswith("？") and "裡" not in t for t in train_targets)
    assert any(t.endswith("车站在哪里？") for t in train_targets)
    test_refs = [t for _, t in prepared.test_pairs]
    assert all(t.endswith("？") for t in test_refs)  # punctuation is cleaning: applied everywhere
    assert any("車站在哪裡" in t for t in test_refs)  # the script is not: references as given


def test_pipeline_merges_pairs_that_differ_only_in_script(tmp_path):
    lines = [f"Line {i}.\t第{i}行。\n" for i in range(60)] + ["I love you.\t我愛你。\n", "I love you.\t我爱你。\n"]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    table = {"corpus": "tsv", "path": str(path), "valid_size": 0, "test_size": 0, "zh_script": "simplified"}
    config = config_from_dict({"model": {"preset": "transformer-tiny", "vocab_size": 10}, "data": table})
    report = pipeline.prepare(config).report
    assert report["merged_by_script"] == 1 and report["train"] == 61


# --- evaluation ---


def test_scores_against_given_and_script_normalised_references():
    """A simplified hypothesis: partial credit against the traditional reference, full against its conversion."""
    hyps, refs = ["我爱你。", "车站在哪里？"], ["我愛你。", "車站在哪裡？"]
    scores = translation_scores(hyps, refs, target_lang="zh", zh_script="simplified")
    assert scores.bleu < 50 and scores.chrf < 50
    assert scores.bleu_script == pytest.approx(100.0) and scores.chrf_script == pytest.approx(100.0)
    assert scores.as_dict("test_") == {
        "test_bleu": scores.bleu,
        "test_chrf": scores.chrf,
        "test_bleu_simplified": scores.bleu_script,
        "test_chrf_simplified": scores.chrf_script,
    }


def test_no_script_scores_without_conversion():
    """ "keep", or a target that is not Chinese: the as-given scores only, as before."""
    keep = translation_scores(["我爱你。"], ["我愛你。"], target_lang="zh")
    assert keep.bleu_script is None and set(keep.as_dict()) == {"bleu", "chrf"}
    english = translation_scores(["I love you."], ["I love you."], target_lang="en", zh_script="simplified")
    assert english.bleu_script is None and english.bleu == pytest.approx(100.0)
    with pytest.raises(ValueError, match="zh_script must be one of"):
        translation_scores(["a"], ["a"], target_lang="zh", zh_script="hans")


def test_checkpoint_eval_cleans_references_as_the_run_was_trained():
    """A run saved before zh_script existed was trained on NFKC'd text: its references are NFKC'd too."""
    assert _cleaning({"target_lang": "zh"}) == CleaningConfig()  # old run: "？" -> "?" as in its training
    assert _cleaning({"target_lang": "zh", "zh_script": "keep"}) == CleaningConfig(chinese="target")
    assert _cleaning({"source_lang": "zh", "target_lang": "en", "zh_script": "simplified"}).chinese == "source"


TINY_RUN = """
[model]
preset = "transformer-tiny"
vocab_size = 100
d_model = 32
max_seq_len = 64
[data]
corpus = "synthetic"
synthetic_pairs = 400
valid_size = 20
test_size = 20
zh_script = "simplified"
[train]
steps = 4
eval_every = 4
log_every = 2
bleu_samples = 8
batch_tokens = 512
"""


def test_both_score_variants_reach_summary_and_eval(tmp_path, capsys):
    """The final test (summary.json, printed) and `moeformer eval` report as-given and simplified scores."""
    from moeformer.cli import main
    from moeformer.data.synthetic import generate_pairs

    config = tmp_path / "tiny.toml"
    config.write_text(TINY_RUN, encoding="utf-8")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    test = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))["test"]
    assert {"test_bleu", "test_chrf", "test_bleu_simplified", "test_chrf_simplified"} <= set(test)
    assert "test_bleu_simplified=" in capsys.readouterr().out
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{s}\t{t}\n" for s, t in generate_pairs(8, seed=99)), encoding="utf-8")
    assert main(["eval", str(tmp_path / "run"), "--data", str(data)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"bleu", "chrf", "bleu_simplified", "chrf_simplified"} <= set(scores)
