"""``moeformer demo``: train a small DeepSeekMoE Transformer translator, then show what it learned.

By default it needs nothing but this package: the corpus is generated (English -> Chinese
numbers, dates, times and quantities: "at 3:45 pm on May 2nd" -> "5月2日下午3点45分", a real
reordering and numeral-system task); a few minutes on a laptop CPU reach a high BLEU on
held-out generated pairs. The demo trains a fixed number of steps (seeded, deterministic on a CPU),
so it gives the same model and the same BLEU on every machine, busy or not; ``--minutes`` trades
that for a time budget. ``--corpus tatoeba`` trains the same model on the real Tatoeba
English-Mandarin pairs instead (the article's "Are you OK?" -> "你好吗？").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moeformer.config import Config, config_from_dict
from moeformer.inference import translate
from moeformer.runtime import keep_freed_memory
from moeformer.train.run import run_training

# A post-norm encoder-decoder (the paper's layout) whose FFNs are DeepSeekMoE layers: 1 shared and
# 7 routed experts of 128, top-3 (m = 4 segmentation of 2 coarse experts of 512, top-1).
MODEL = {
    "preset": "transformer-tiny",
    "vocab_size": 100,
    "d_model": 128,
    "n_layers": 3,
    "dropout": 0.1,
    "share_embeddings": True,
    "max_seq_len": 128,
    "attention": {"n_heads": 4},
    "ffn": {"d_ff": 512, "activation": "swiglu", "bias": False},
    "moe": {"kind": "deepseek", "n_experts": 7, "top_k": 3, "expert_hidden": 128, "n_shared": 1, "balance_loss": 0.01},
}
EXAMPLES = {
    "synthetic": ["at 3:45 pm on May 2nd", "I have 3 books.", "on June 1st, 2021 at 9:05 am", "She is 21 years old."],
    "tatoeba": ["Are you OK?", "I love you.", "What is your name?", "The weather is nice today."],
}
DEMO_STEPS = 700  # held-out BLEU 83.3 (RESULTS.md); about 3.5 minutes on a 2-core laptop-class CPU
TATOEBA_DEFAULT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cmn-eng" / "cmn.txt"


@dataclass
class DemoReport:
    corpus: str
    run_dir: Path
    parameters: int
    steps: int
    test_pairs: int
    test_bleu: float
    test_chrf: float
    # against the references converted to the run's data.zh_script (Tatoeba: simplified); None if "keep"
    test_bleu_simplified: float | None = None
    test_chrf_simplified: float | None = None
    held_out: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reference, output)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (source, output)

    def __str__(self) -> str:
        lines = [
            f"DeepSeekMoE Transformer ({self.parameters:,} parameters) trained {self.steps} steps on the "
            f"{self.corpus} corpus; run directory: {self.run_dir}",
            f"Held-out test set ({self.test_pairs} pairs): BLEU {self.test_bleu:.1f} (sacrebleu, zh tokenizer), "
            f"chrF {self.test_chrf:.1f}" + self._simplified(),
            "",
            "Held-out translations (output | reference):",
            *(f"  {s!r:40} -> {h} | {r}" for s, r, h in self.held_out),
            "",
            "More:",
            *(f"  {s!r:40} -> {h}" for s, h in self.examples),
            "",
        ]
        if self.corpus == "synthetic":
            lines.append(
                "The real corpus: moeformer demo --corpus tatoeba [--data PATH/cmn.txt]  (or moeformer "
                "train configs/tatoeba-en-zh-deepseek.toml)"
            )
        lines.append(f'Translate with it: moeformer translate {self.run_dir} "Are you OK?"')
        return "\n".join(lines)

    def _simplified(self) -> str:
        if self.test_bleu_simplified is None or self.test_chrf_simplified is None:
            return ""
        return (
            f" against the references as given; BLEU {self.test_bleu_simplified:.1f}, chrF "
            f"{self.test_chrf_simplified:.1f} against them in simplified script (the script the model was taught)"
        )


def demo_config(
    corpus: str,
    data: str | None,
    minutes: float | None,
    steps: int | None,
    *,
    data_root: str | Path | None = None,
) -> Config:
    """The demo's config: ``steps`` updates, or as many as ``minutes`` allow when that is given.

    The Tatoeba file is ``data``, else ``data_root/cmn-eng/cmn.txt`` (the CLI passes $MOEFORMER_DATA;
    None: relative to the working directory), else the checkout's ``../shared/data`` copy.
    """
    if corpus == "synthetic":
        data_table = {"corpus": "synthetic", "synthetic_pairs": 20000, "valid_size": 300, "test_size": 500}
    else:
        path = Path(data) if data else Path(data_root or "") / "cmn-eng" / "cmn.txt"
        if not data and not path.is_file():
            path = TATOEBA_DEFAULT.resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"no Tatoeba file at {path}; pass --data PATH/cmn.txt, or fetch it with `moeformer data download "
                "tatoeba-cmn` (needs a network)"
            )
        data_table = {
            "corpus": "tatoeba",
            "path": str(path),
            "zh_script": "simplified",  # one script, full-width punctuation: "Are you OK?" -> "你好吗？"
            "tokenizer": "bpe",
            "vocab_size": 8000,
            "valid_size": 500,
            "test_size": 1000,
        }
    steps = steps or (1_000_000 if minutes else DEMO_STEPS)
    train = {
        "steps": steps,
        "max_minutes": minutes,
        "eval_every": min(200, steps),
        "log_every": 20,
        "bleu_samples": 200,
        "batch_tokens": 3000,
        "lr": 2e-3,
        "schedule": "cosine",  # a fixed number of steps: decay to the end of them
        "warmup_steps": min(100, steps),
    }
    return config_from_dict({"model": MODEL, "data": data_table, "train": train})


def run_demo(
    *,
    corpus: str = "synthetic",
    data: str | None = None,
    data_root: str | Path | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    run_dir: Path = Path("runs/demo"),
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> DemoReport:
    """Train ``steps`` updates (default DEMO_STEPS; or for ``minutes``), score the best checkpoint on
    the test split (``data`` / ``data_root``: where the Tatoeba file is, see :func:`demo_config`).
    A previous demo run in ``run_dir`` is replaced (only a run: see ``claim_run_dir``)."""
    config = demo_config(corpus, data, minutes, steps, data_root=data_root)
    keep_freed_memory()
    run_dir = Path(run_dir) / corpus
    outcome = run_training(config, run_dir, progress=progress, force=True, echo=echo)
    from moeformer.inference import load_model

    loaded = load_model(run_dir)
    examples = EXAMPLES[corpus]
    outputs = translate(loaded.model, loaded.tokenizers, examples, beam_size=4)
    return DemoReport(
        corpus=corpus,
        run_dir=run_dir,
        parameters=loaded.model.num_parameters(),
        steps=outcome.result.step,
        test_pairs=int(outcome.test_scores.get("test_pairs", 0)),
        test_bleu=outcome.test_scores.get("test_bleu", 0.0),
        test_chrf=outcome.test_scores.get("test_chrf", 0.0),
        test_bleu_simplified=outcome.test_scores.get("test_bleu_simplified"),
        test_chrf_simplified=outcome.test_scores.get("test_chrf_simplified"),
        held_out=outcome.samples[:8],
        examples=list(zip(examples, outputs)),
    )
