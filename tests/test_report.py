"""`moeformer report`: one self-contained page (inlined images and font, escaped text, no
outside address) that a real headless Chromium loads without errors; the CJK font and the
training-log reader it relies on."""

from __future__ import annotations

import io
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
from inspect_models import PAIRS, save_run, tiny_loaded, write_pairs

from moeformer.cli import main
from moeformer.inspect import fonts
from moeformer.inspect.curves import find_log, plot_curves, plot_expert_load, read_log

pytestmark = pytest.mark.usefixtures("single_thread")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without these, Chromium on a machine with no network waits on its background services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report of a tiny MoE translator; its example sentence holds markup that must be escaped."""
    root = tmp_path_factory.mktemp("report")
    run = save_run(root / "run", tiny_loaded())
    data = write_pairs(root / "pairs.tsv", [("<b>Tom</b> & Mary?", "<汤姆>和玛丽？"), *PAIRS])
    sentence = ["--text", "<b>Tom</b> & Mary?", "--target", "<汤姆>和玛丽？"]
    assert main(["report", str(run), "--data", str(data), "--out", str(root / "out"), "--quiet", *sentence]) == 0
    return root / "out" / "report.html"


def test_the_page_is_self_contained_and_escaped(report):
    page = report.read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) >= 7  # curves, 3 attention kinds, sentence routing, load, measures
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in page and "https://" not in page  # ":" is not a base64 character
    assert not re.search(r"<(script|link|iframe)\b", page)
    assert "&lt;b&gt;Tom&lt;/b&gt; &amp; Mary?" in page and "<b>Tom</b>" not in page
    assert "&lt;汤姆&gt;和玛丽？" in page
    assert '@font-face { font-family: "moeformer-cjk"; src: url("data:font/otf;base64,' in page
    for section in ("Model", "Training", "Attention", "Expert routing"):
        assert f"<h2>{section}</h2>" in page


def test_a_dense_model_gets_a_page_without_routing(tmp_path):
    run = save_run(tmp_path / "run", tiny_loaded(moe=None))
    data = write_pairs(tmp_path / "pairs.tsv")
    assert main(["report", str(run), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "no MoE layer" in page and page.count("<img ") == 4  # curves + 3 attention kinds


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_chromium_loads_the_page_without_errors_and_shows_every_image(report, tmp_path):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
            page.goto(report.as_uri(), wait_until="load", timeout=60_000)
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            fonts_ok = page.evaluate("document.fonts.check('16px \"moeformer-cjk\"', '你好')")
        finally:
            browser.close()
    assert problems == []
    assert len(images) >= 7 and all(complete and width > 0 for complete, width, _ in images), images
    assert fonts_ok


def test_chinese_labels_render_with_the_packaged_noto_sans_sc():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    fonts.find_cjk_font.cache_clear()
    with warnings.catch_warnings(record=True) as caught, fonts.plot_style() as font:
        warnings.simplefilter("always")
        fig, ax = plt.subplots()
        text = ax.set_title("你好吗？我有三本书。")
        fig.savefig(io.BytesIO(), format="png")
        used = font_manager.findfont(font_manager.FontProperties(family=text.get_fontfamily()[0]))
        plt.close(fig)
    assert font.source == "package" and font.family == "Noto Sans SC"
    assert Path(used) == fonts.package_font_path()
    assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_without_a_cjk_font_plotting_warns_how_to_install_one(monkeypatch):
    monkeypatch.setattr(fonts, "package_font_path", lambda: None)
    monkeypatch.setattr(fonts, "SYSTEM_FAMILIES", ())
    fonts.find_cjk_font.cache_clear()
    try:
        with pytest.warns(fonts.CJKFontWarning, match=r"moeformer\[inspect\]"), fonts.plot_style() as font:
            assert font.source == "none"
    finally:
        fonts.find_cjk_font.cache_clear()


def test_the_font_subset_holds_just_the_pages_characters():
    from fontTools.ttLib import TTFont

    data = fonts.font_subset("Tom 汤姆和玛丽")
    cmap = TTFont(io.BytesIO(data)).getBestCmap()
    assert {ord(c) for c in "汤姆和玛丽"} <= set(cmap) and ord("猫") not in cmap
    assert len(data) < 100_000 and fonts.font_subset("ascii only") is None


def test_the_training_log_reader_skips_bad_lines(tmp_path):
    log_file = tmp_path / "metrics.jsonl"
    log_file.write_text('{"step": 1, "loss": 3.0, "lr": 0.1}\nnot json\n[1]\n{"step": 2, "valid_loss": 2.0}\n\n')
    log = read_log(log_file)
    assert (len(log.train), len(log.evals), log.skipped) == (1, 1, 2)
    assert plot_curves(log).startswith(b"\x89PNG")
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    assert find_log(tmp_path / "checkpoints" / "step-1") == log_file
    log_file.write_text("garbage\n")
    assert plot_curves(read_log(log_file)) is None
    assert plot_expert_load(read_log(log_file)) is None


def test_expert_load_over_training_is_read_per_layer(tmp_path):
    log_file = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0, "expert_load": {"layers.1": [0.5, 0.25, 0.25], "layers.3": "bad"}} for s in (1, 2)]
    log_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = read_log(log_file)
    assert log.expert_load == {"layers.1": ([1.0, 2.0], [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])}
    assert plot_expert_load(log).startswith(b"\x89PNG")


def test_one_logged_step_draws_without_a_warning(tmp_path):
    """A run stopped after its first log line: matplotlib warned of identical xlims (a zero-width extent)."""
    log_file = tmp_path / "metrics.jsonl"
    log_file.write_text(json.dumps({"step": 5, "loss": 1.0, "expert_load": {"layers.1": [0.5, 0.5]}}) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plot_expert_load(read_log(log_file)).startswith(b"\x89PNG")
        assert plot_curves(read_log(log_file)).startswith(b"\x89PNG")
    assert [str(w.message) for w in caught] == []


def test_the_model_facts_say_what_a_soft_layer_does():
    """A soft layer routes every token to every expert: no "top-2" from its config's unused top_k."""
    from moeformer.config import MoEConfig
    from moeformer.inspect.report import _moe_fact

    assert _moe_fact(MoEConfig(kind="soft", n_experts=4)) == "soft: every token to all 4 experts (softmax gate)"
    deepseek = MoEConfig(kind="deepseek", n_experts=4, top_k=2, granularity=2, n_shared=1, noisy=True)
    assert _moe_fact(deepseek) == "deepseek: 8 experts, top-4, noisy, softmax scores, 1 shared"


def test_notes_from_drawing_are_one_line_each():
    from moeformer.inspect.notes import Notes, collecting_notes

    raised = [UserWarning(f"Glyph {ord(ch)} (\\N{{X}}) missing from font(s) DejaVu Sans.") for ch in "汉字汉"]
    raised += [fonts.CJKFontWarning("no font"), fonts.CJKFontWarning("no font"),
               UserWarning("Attempting to set identical low and high xlims makes transformation singular"),
               RuntimeWarning("something else"), RuntimeWarning("something else")]  # fmt: skip
    with collecting_notes(Notes()) as notes:
        for warning in raised:
            warnings.warn(warning, stacklevel=1)
    lines = notes.messages()
    assert len(lines) == 2 and lines[1] == "something else"
    assert "2 characters have no glyph in the font(s) used (DejaVu Sans)" in lines[0] and ": 汉 字;" in lines[0]
    assert "no font with Chinese glyphs" in lines[0]
