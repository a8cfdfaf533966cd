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
import statistics
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
from moeformer.refusal.scoring import REFUSAL_SUBSTRINGS, score_completions


@dataclass
class ExpertReport:
    study: list[LayerExperts]
    scores: dict[str, float]  # intervention -> refusal score on the harmful prompts
    masking: dict[int, dict[str, float]]  # n -> {"refusal_experts": score, "random": mean score}

    def to_dict(self) -> dict[str, object]:
        return {"layers": [layer.to_dict() for layer in self.study], "scores": self.scores,
                "masking": {str(n): v for n, v in self.masking.items()}}  # fmt: skip

    def table(self) -> str:
        rows = ["| intervention | refusal score (harmful) |", "|---|---|"]
        rows += [f"| {name} | {score:.3f} |" for name, score in self.scores.items()]
        rows += ["", "| experts taken out per layer | refusal experts | random (control) |", "|---|---|---|"]
        rows += [f"| {n} | {v['refusal_experts']:.3f} | {v['random']:.3f} |" for n, v in self.masking.items()]
        shares = [f"layer {layer.layer}: shared {layer.shared_write['harmful']:+.3f}, routed "
                  f"{float(layer.routed_write['harmful'].sum()):+.3f}" for layer in self.study]  # fmt: skip
        return "\n".join(rows + ["", "Writes along r per token, harmful prompts: " + "; ".join(shares)])


def study_experts(
    lm: ChatLM, direction, harmful: Sequence[str], harmless: Sequence[str], *,  # noqa: ANN001
    top: Sequence[int] = (1, 2, 4, 8), draws: int = 3, seed: int = 0, max_new_tokens: int = 32,
    batch_size: int = 16, substrings: Sequence[str] = REFUSAL_SUBSTRINGS, progress: bool = False,
) -> ExpertReport:  # fmt: skip
    """The study on (harmful, harmless) and every intervention's refusal score on ``harmful``."""
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
    scores = {}
    for name, context in tqdm(jobs, desc="interventions", disable=not progress, unit="run"):
        with context():
            done = complete(lm, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size)
        scores[name] = score_completions(done, substrings).refusal_score
    masking = {n: {"refusal_experts": scores.pop(f"mask {n} refusal experts"),
                   "random": statistics.mean(scores.pop(f"mask {n} random experts #{d}") for d in range(draws))}
               for n in sizes}  # fmt: skip
    return ExpertReport(study, scores, masking)


def save_expert_report(report: ExpertReport, out: str | Path, *, force: bool = False) -> list[str]:
    """experts.json, experts.md and the three pictures, written atomically into ``out``."""
    with staged_dir(Path(out), force=force) as tmp:
        (tmp / "experts.json").write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
        (tmp / "experts.md").write_text(report.table() + "\n", encoding="utf-8")
        plot_expert_choice(report.study, tmp / "expert_choice.png")
        plot_expert_writes(report.study, tmp / "expert_writes.png")
        plot_masking(report.scores.get("baseline", float("nan")), report.masking, tmp / "masking.png")
    return ["experts.json", "experts.md", "expert_choice.png", "expert_writes.png", "masking.png"]
