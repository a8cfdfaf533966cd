"""Choosing one direction among the candidates (Arditi et al. 2024, section 2.3 and appendix C).

The refusal metric of a prompt is the log-odds of the model's refusal tokens R (e.g. "I" as in
"I cannot") at the first generated position: p = sum_{t in R} P(t), metric = log p - log(1 - p);
or, with whole refusal openers (:mod:`moeformer.refusal.openers`), of beginning with one of them.
Each candidate r_i^(l) gets three scores on validation prompts:

- bypass: mean refusal metric on harmful prompts with r ablated everywhere (lower = removes refusal);
- induce: mean refusal metric on harmless prompts with r added at layer l (higher = adds refusal);
- kl: mean KL(baseline || ablated) of the next-token distribution at the last position of
  harmless prompts (low = ablation leaves ordinary behaviour alone).

Candidates from layers at or beyond 80% of the depth, with kl > 0.1, or with induce <= 0 are
discarded; the one with the lowest bypass score is chosen. A candidate can also be chosen by hand
(``manual=(position, layer)``): then only it is scored and no filter applies. When the filters
discard every candidate, :class:`NoDirectionChosen` carries the scores, so that they can still be
written and a candidate picked by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moeformer.refusal.directions import Candidates
from moeformer.refusal.interventions import BASELINE, Intervention
from moeformer.refusal.lm import ChatLM, RefusalError, iter_batches
from moeformer.refusal.openers import RefusalOpeners, log_odds


def refusal_metric(logits: Tensor, refusal_ids: Sequence[int], eps: float = 1e-8) -> Tensor:
    """logits: (B, V) at the first generated position -> (B,) log-odds of the refusal tokens."""
    probs = torch.softmax(logits.float(), dim=-1)
    return log_odds(probs[:, list(refusal_ids)].sum(-1), eps)


@torch.no_grad()
def last_logits(
    lm: ChatLM, instructions: Sequence[str], intervention: Intervention = BASELINE, *, batch_size: int = 32
) -> Tensor:
    """(N, V) float32 logits at the last prompt position of each chat-formatted instruction."""
    out = []
    with intervention.apply(lm):
        for chunk in iter_batches(instructions, batch_size):
            out.append(lm.forward_logits(lm.batch(chunk))[:, -1])
    return torch.cat(out)


def kl_divergence(base: Tensor, other: Tensor) -> Tensor:
    """(N, V) logits each -> (N,) KL(softmax(base) || softmax(other))."""
    base_logp, other_logp = base.log_softmax(-1), other.log_softmax(-1)
    return (base_logp.exp() * (base_logp - other_logp)).sum(-1)


@dataclass
class CandidateScore:
    position: int  # negative position among the eoi tokens
    layer: int
    bypass: float
    induce: float
    kl: float
    discarded: str | None = None  # why it was filtered out, or None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Selection:
    scores: list[CandidateScore]
    chosen: CandidateScore | None  # None: every candidate was filtered out (see NoDirectionChosen)
    direction: Tensor | None  # (d_model,) float32, the raw difference of means (its norm matters for actadd)
    baseline_harmful: float  # mean refusal metric without intervention
    baseline_harmless: float
    chosen_by: str = "filters"  # or "hand": --layer / --position, no filter applied


class NoDirectionChosen(RefusalError):
    """Every candidate was filtered out; ``selection`` holds all the scores and ``chosen`` None."""

    def __init__(self, message: str, selection: Selection) -> None:
        super().__init__(message)
        self.selection = selection
        self.extraction: object | None = None  # the whole Extraction, set by refusal.extract.extract

    def suggestion(self, n_layers: int, max_layer_fraction: float) -> CandidateScore | None:
        """The candidate to try by hand: lowest bypass below the layer cutoff (else anywhere), finite scores."""
        finite = [c for c in self.selection.scores if c.bypass == c.bypass and c.kl == c.kl]  # NaN != NaN
        early = [c for c in finite if c.layer < int(n_layers * max_layer_fraction)]
        return min(early or finite, key=lambda c: c.bypass, default=None)


def check_manual(position: int, layer: int, n_eoi: int, n_layers: int) -> None:
    """Refuse a hand-picked candidate outside the grid, naming the allowed ranges."""
    if not -n_eoi <= position <= -1:
        raise RefusalError(f"--position {position}: the template has {n_eoi} tokens after the instruction, "
                           f"so positions are -{n_eoi} to -1")  # fmt: skip
    if not 0 <= layer < n_layers:
        raise RefusalError(f"--layer {layer}: the model has {n_layers} layers, so layers are 0 to {n_layers - 1}")


def score_candidates(
    lm: ChatLM,
    candidates: Candidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    openers: RefusalOpeners,
    *,
    batch_size: int = 32,
    progress: bool = False,
    only: tuple[int, int] | None = None,
) -> tuple[list[CandidateScore], float, float]:
    """The three scores of every candidate (or of ``only`` = (position, layer)), plus the baseline
    metrics on harmful and harmless prompts."""
    if not harmful_val or not harmless_val:
        raise RefusalError("direction selection needs harmful and harmless validation instructions")
    base_harmful = openers.metric(lm, harmful_val, batch_size=batch_size).mean()
    base_harmless_logits = last_logits(lm, harmless_val, batch_size=batch_size)
    base_harmless = openers.metric(lm, harmless_val, batch_size=batch_size).mean()
    n_pos = candidates.directions.shape[0]
    grid = [(i, layer) for i in range(n_pos) for layer in range(lm.n_layers)]
    if only is not None:
        grid = [(n_pos + only[0], only[1])]
    scores = []
    for i, layer in tqdm(grid, desc="scoring candidates", disable=not progress, unit="cand"):
        r = candidates.directions[i, layer]
        if r.norm() < 1e-8:  # identical means: nothing to ablate or add
            scores.append(CandidateScore(i - len(candidates.positions), layer, float("nan"), float("nan"),
                                         float("nan"), "zero difference of means"))  # fmt: skip
            continue
        ablation = Intervention("ablation", r)
        bypass = openers.metric(lm, harmful_val, ablation, batch_size=batch_size)
        induced = openers.metric(lm, harmless_val, Intervention("actadd", r, layer), batch_size=batch_size)
        ablated = last_logits(lm, harmless_val, ablation, batch_size=batch_size)
        scores.append(
            CandidateScore(
                position=i - candidates.directions.shape[0],
                layer=layer,
                bypass=float(bypass.mean()),
                induce=float(induced.mean()),
                kl=float(kl_divergence(base_harmless_logits, ablated).mean()),
            )
        )
    return scores, float(base_harmful), float(base_harmless)


def filter_and_choose(
    scores: list[CandidateScore], n_layers: int, *, max_layer_fraction: float = 0.8, kl_threshold: float = 0.1
) -> CandidateScore:
    """Mark discarded candidates (in place) and return the kept one with the lowest bypass score."""
    cutoff = int(n_layers * max_layer_fraction)
    for s in scores:
        if s.discarded:
            continue
        if s.layer >= cutoff:
            s.discarded = f"layer >= {cutoff} ({max_layer_fraction:.0%} of {n_layers} layers)"
        elif not s.kl <= kl_threshold:  # NaN counts as too large
            s.discarded = f"kl {s.kl:.3g} > {kl_threshold}"
        elif not s.induce > 0:
            s.discarded = f"induce {s.induce:.3g} <= 0"
    kept = [s for s in scores if s.discarded is None]
    if not kept:
        reasons = sorted({s.discarded.split(" ")[0] for s in scores if s.discarded})
        raise RefusalError(
            f"every one of the {len(scores)} candidate directions was filtered out (reasons: {', '.join(reasons)}); "
            "loosen --kl-threshold / --max-layer-fraction, or the model may not refuse these prompts"
        )
    return min(kept, key=lambda s: s.bypass)


def select_direction(
    lm: ChatLM,
    candidates: Candidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    openers: RefusalOpeners,
    *,
    batch_size: int = 32,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    progress: bool = False,
    manual: tuple[int, int] | None = None,
) -> Selection:
    """Score every candidate, filter, and choose (the paper's procedure); or score and take ``manual``
    = (position, layer). Raises :class:`NoDirectionChosen` when the filters leave nothing."""
    if manual is not None:
        check_manual(*manual, candidates.directions.shape[0], lm.n_layers)
    scores, base_harmful, base_harmless = score_candidates(
        lm, candidates, harmful_val, harmless_val, openers, batch_size=batch_size, progress=progress, only=manual
    )
    if manual is not None:
        chosen, chosen_by = scores[0], "hand"
    else:
        try:
            chosen = filter_and_choose(
                scores, lm.n_layers, max_layer_fraction=max_layer_fraction, kl_threshold=kl_threshold
            )
        except RefusalError as err:
            raise NoDirectionChosen(str(err), Selection(scores, None, None, base_harmful, base_harmless)) from None
        chosen_by = "filters"
    direction = candidates.directions[candidates.positions.index(chosen.position), chosen.layer]
    return Selection(scores, chosen, direction.clone(), base_harmful, base_harmless, chosen_by)
