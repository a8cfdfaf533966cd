"""``moeformer refusal experts``: the expert study and its interventions, measured and written out.

Interventions, each scored by the paper's substring refusal score on the harmful prompts (greedy
completions): baseline; directional ablation (the paper); the top-n "refusal experts" of every
MoE layer taken out of routing, against n random experts (the control, mean over seeded draws);
the direction removed from the shared experts' output only, and from the routed experts' only.
Written: ``experts.json`` (the study and every score), ``experts.md`` and three pictures.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from moeformer.publish import staged_dir
from moeformer.refusal.evaluation import complete
from moeformer.refusal.experts import (
    LayerExperts,
    ablate_in_part,
    expert_study,
    mask_experts,
    random_experts,
    refusal_experts,
)
from moeformer.refusal.interventions import ablate
from moeformer.refusal.lm import ChatLM
from moeformer.refusal.moe_views import moe_views
from moeformer.refusal.plots import plot_expert_choice, plot_expert_writes, plot_masking
from moeformer.refusal.scoring import REFUSAL_SUBSTRINGS, is_refusal


@dataclass
class ExpertReport:
    study: list[LayerExperts]
    responses: dict[str, list[str]]  # intervention -> greedy completion of every harmful prompt
    substrings: tuple[str, ...]  # the refusal phrases of the main score (the paper's by default)
    extra_substrings: tuple[str, ...] = ()  # more phrases (a subject's own refusals): a second score
    draws: int = 1

    def scores(self, substrings: Sequence[str] | None = None) -> dict[str, float]:
        """intervention -> refusal score on the harmful prompts (random-control draws averaged)."""
        phrases = self.substrings if substrings is None else substrings
        raw = {name: is_refusal_rate(texts, phrases) for name, texts in self.responses.items()}
        out: dict[str, float] = {}
        for name, value in raw.items():
            base, _, draw = name.partition(" #")
            out.setdefault(base, 0.0)
            out[base] += value / (self.draws if draw else 1)
        return out

    def to_dict(self) -> dict[str, object]:
        out = {"layers": [layer.to_dict() for layer in self.study], "scores": self.scores(),
               "responses": self.responses, "substrings": list(self.substrings)}  # fmt: skip
        if self.extra_substrings:
            out["scores_with_extra_phrases"] = self.scores(self.substrings + self.extra_substrings)
            out["extra_substrings"] = list(self.extra_substrings)
        return out

    def table(self) -> str:
        main = self.scores()
        extra = self.scores(self.substrings + self.extra_substrings) if self.extra_substrings else None
        head = "| intervention | refusal score (paper's phrases) |" + (" + extra phrases |" if extra else "")
        rows = [head + " first completion |", "|---|---|" + ("---|" if extra else "") + "---|"]
        for name, score in main.items():
            sample = next((texts[0] for n, texts in self.responses.items() if n.startswith(name)), "")
            cells = f"| {name} | {score:.3f} |" + (f" {extra[name]:.3f} |" if extra else "")
            rows.append(cells + f" {sample.strip()[:60]!r} |")
        shares = [f"layer {layer.layer}: shared {layer.shared_write['harmful']:+.3f}, routed "
                  f"{float(layer.routed_write['harmful'].sum()):+.3f}" for layer in self.study]  # fmt: skip
        return "\n".join(rows + ["", "Writes along r per token, harmful prompts: " + "; ".join(shares)])


def is_refusal_rate(texts: Sequence[str], substrings: Sequence[str]) -> float:
    return sum(is_refusal(t, substrings) for t in texts) / max(len(texts), 1)


def masking_curve(scores: dict[str, float], sizes: Sequence[int]) -> dict[int, dict[str, float]]:
    """n -> {"refusal_experts": score, "random": score} from :meth:`ExpertReport.scores`."""
    return {n: {"refusal_experts": scores[f"mask {n} refusal experts"], "random": scores[f"mask {n} random experts"]}
            for n in sizes if f"mask {n} refusal experts" in scores}  # fmt: skip


def study_experts(
    lm: ChatLM, direction, harmful: Sequence[str], harmless: Sequence[str], *,  # noqa: ANN001
    top: Sequence[int] = (1, 2, 4, 8), draws: int = 3, seed: int = 0, max_new_tokens: int = 32,
    batch_size: int = 16, substrings: Sequence[str] = REFUSAL_SUBSTRINGS, extra_substrings: Sequence[str] = (),
    progress: bool = False,
) -> ExpertReport:  # fmt: skip
    """The study on (harmful, harmless) and every intervention's completions of ``harmful``."""
    study = expert_study(lm, direction, harmful, harmless, batch_size=batch_size)
    views = moe_views(lm)
    room = min(view.n_experts - view.top_k for view in views.values())
    sizes = [n for n in top if 0 < n <= room]
    parts = ["routed"] + (["shared"] if all(view.shared_module is not None for view in views.values()) else [])
    jobs: list[tuple[str, Callable[[], contextlib.AbstractContextManager]]] = [
        ("baseline", contextlib.nullcontext),
        ("directional ablation", lambda: ablate(lm, direction)),
        *[(f"ablation in {p} experts only", lambda p=p: ablate_in_part(lm, direction, p)) for p in parts],
        *[(f"mask {n} refusal experts", lambda n=n: mask_experts(lm, refusal_experts(study, n))) for n in sizes],
        *[(f"mask {n} random experts #{d}", lambda n=n, d=d: mask_experts(lm, random_experts(study, n, seed + d)))
          for n in sizes for d in range(draws)],
    ]  # fmt: skip
    responses = {}
    for name, context in tqdm(jobs, desc="interventions", disable=not progress, unit="run"):
        with context():
            done = complete(lm, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size)
        responses[name] = [c.response for c in done]
    return ExpertReport(study, responses, tuple(substrings), tuple(extra_substrings), draws)


def save_expert_report(report: ExpertReport, out: str | Path, *, force: bool = False) -> list[str]:
    """experts.json, experts.md and the three pictures, written atomically into ``out``."""
    with staged_dir(Path(out), force=force) as tmp:
        (tmp / "experts.json").write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
        (tmp / "experts.md").write_text(report.table() + "\n", encoding="utf-8")
        plot_expert_choice(report.study, tmp / "expert_choice.png")
        plot_expert_writes(report.study, tmp / "expert_writes.png")
        sizes = sorted({int(n.split()[1]) for n in report.responses if n.startswith("mask ")})
        lists = {"paper's phrases": report.substrings}
        if report.extra_substrings:
            lists["+ extra phrases"] = report.substrings + report.extra_substrings
        curves = {label: (report.scores(p)["baseline"], masking_curve(report.scores(p), sizes))
                  for label, p in lists.items()}  # fmt: skip
        plot_masking(curves, tmp / "masking.png")
    return ["experts.json", "experts.md", "expert_choice.png", "expert_writes.png", "masking.png"]
