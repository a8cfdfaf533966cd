"""Evaluating a direction (Arditi et al. 2024, sections 3-4): completions under each condition.

Conditions: ``baseline``; ``ablation`` (directional ablation everywhere, eq. 4); ``actadd`` (the
direction added at its layer, eq. 3); ``orthogonalized`` (a copy of the model with the ablation
baked into its weights, section 4.1). For each: greedy completions of held-out harmful and
harmless instructions, their refusal score (the paper's substring rule), the mean KL(baseline ||
condition) of the next-token distribution at the last prompt position of harmless prompts, and
the mean next-token cross-entropy on harmless text, the harmless prompts unless ``loss_texts``
are given (plain text is the paper's check: does the edit damage ordinary modelling?).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moeformer.publish import staged_dir
from moeformer.refusal.interventions import BASELINE, Intervention
from moeformer.refusal.lm import ChatLM, RefusalError, iter_batches
from moeformer.refusal.orthogonalize import orthogonalize
from moeformer.refusal.scoring import REFUSAL_SUBSTRINGS, Completion, score_completions
from moeformer.refusal.selection import kl_divergence, last_logits
from moeformer.results import check_output

CONDITIONS = ("baseline", "ablation", "actadd", "orthogonalized")


@torch.no_grad()
def complete(
    lm: ChatLM,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generating",
) -> list[Completion]:
    """Greedy completions of chat-formatted instructions (under whatever hooks are active)."""
    out = []
    for chunk in tqdm(iter_batches(instructions, batch_size), desc=desc, disable=not progress, unit="batch"):
        for text, ids in zip(chunk, lm.generate_ids(lm.batch(chunk), max_new_tokens)):
            out.append(Completion(text, lm.decode(ids)))
    return out


@torch.no_grad()
def text_loss(lm: ChatLM, texts: Sequence[str], *, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the real tokens of raw ``texts``."""
    total, count = 0.0, 0
    for chunk in iter_batches(texts, batch_size):
        batch = lm.batch(chunk, chat=False)
        logits = lm.forward_logits(batch)[:, :-1]
        targets, real = batch.ids[:, 1:], ~batch.padding_mask[:, 1:] & ~batch.padding_mask[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total += float(nll[real].sum())
        count += int(real.sum())
    return total / count if count else math.nan


@dataclass
class ConditionResult:
    condition: str
    harmful_refusal: float
    harmless_refusal: float
    kl: float
    loss: float
    completions: dict[str, list[Completion]] = field(default_factory=dict)

    def row(self) -> dict[str, float | str]:
        return {k: getattr(self, k) for k in ("condition", "harmful_refusal", "harmless_refusal", "kl", "loss")}


@dataclass
class EvalReport:
    results: list[ConditionResult]
    layer: int | None
    loss_on: str = "harmless prompts"  # what the loss column was measured on

    def table(self) -> str:
        """A Markdown table: one row per condition."""
        lines = [f"| condition | refusal (harmful) | refusal (harmless) | KL (harmless) | loss ({self.loss_on}) |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for r in self.results:
            lines.append(
                f"| {r.condition} | {r.harmful_refusal:.3f} | {r.harmless_refusal:.3f} | {r.kl:.4f} | {r.loss:.4f} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "loss_on": self.loss_on,
            "conditions": [r.row() for r in self.results],
            "completions": {
                r.condition: {k: [vars(c) for c in v] for k, v in r.completions.items()} for r in self.results
            },
        }


def save_evaluation(
    report: EvalReport, out: str | Path, *, routing: list[dict] | None = None, force: bool = False
) -> list[str]:
    """Write ``eval.json`` (the table, every completion, ``routing`` if given), ``eval.md`` and, with
    ``routing`` (:meth:`LayerRouting.to_dict` entries), ``routing.png`` as one published directory.

    Returns the names written. ``force`` replaces an old output (see :mod:`moeformer.results`).
    """
    check_output(out, force=force)
    data = report.to_dict()
    if routing:
        data["routing"] = routing
    with staged_dir(out, force=force) as tmp:  # files in it are fsynced when it is published
        (tmp / "eval.json").write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        (tmp / "eval.md").write_text(report.table() + "\n", encoding="utf-8")
        if routing:
            from moeformer.refusal.plots import plot_routing

            plot_routing(routing, tmp / "routing.png")
    return ["eval.json", "eval.md"] + (["routing.png"] if routing else [])


def evaluate(
    lm: ChatLM,
    direction: Tensor,
    layer: int | None,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    conditions: Sequence[str] = CONDITIONS,
    loss_texts: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    substrings: Sequence[str] = REFUSAL_SUBSTRINGS,
    progress: bool = False,
) -> EvalReport:
    """Every condition's refusal scores, KL and loss; ``lm`` itself is left unchanged."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise RefusalError(f"unknown conditions {unknown}; allowed: {', '.join(CONDITIONS)}")
    if "actadd" in conditions and layer is None:
        raise RefusalError("the actadd condition needs the direction's layer (--layer)")
    if not harmful or not harmless:
        raise RefusalError("evaluation needs harmful and harmless instructions")
    lm.check_direction(direction)
    given_texts = bool(loss_texts)
    loss_texts = list(loss_texts) if loss_texts else list(harmless)
    base_logits = last_logits(lm, harmless, batch_size=batch_size)
    results = []
    for condition in conditions:
        with _condition(lm, condition, direction, layer, list(harmful[:4]) + list(harmless[:4])) as target:
            runs = {
                name: complete(target, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress, desc=f"{condition}, {name}")
                for name, prompts in (("harmful", harmful), ("harmless", harmless))
            }  # fmt: skip
            logits = last_logits(target, harmless, batch_size=batch_size)
            loss = text_loss(target, loss_texts, batch_size=batch_size)
        results.append(
            ConditionResult(
                condition,
                score_completions(runs["harmful"], substrings).refusal_score,
                score_completions(runs["harmless"], substrings).refusal_score,
                float(kl_divergence(base_logits, logits).mean()),
                loss,
                runs,
            )
        )
    return EvalReport(results, layer, "given texts" if given_texts else "harmless prompts")


@contextmanager
def _condition(
    lm: ChatLM, condition: str, direction: Tensor, layer: int | None, check_prompts: list[str]
) -> Iterator[ChatLM]:
    if condition == "orthogonalized":  # a copy, so the caller's model keeps its weights
        edited = copy.deepcopy(lm)
        orthogonalize(edited, direction, check_prompts)
        yield edited
        return
    spec = BASELINE if condition == "baseline" else Intervention(condition, direction, layer)
    with spec.apply(lm):
        yield lm
