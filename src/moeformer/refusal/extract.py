"""The paper's extraction pipeline end to end, and its files.

    result = extract(lm, harmful_train, harmless_train, harmful_val, harmless_val, ExtractOptions())
    save_extraction(result, "out/llama-refusal")

Steps (Arditi et al. 2024, section 2 and appendix C): sample n_train / n_val prompts per side;
optionally keep only the harmful train prompts the model refuses (metric > 0) and the harmless
ones it does not (metric < 0); candidate directions by difference in means; score, filter and
choose on the validation prompts.

Files written to the output directory (published as one directory by moeformer.publish.staged_dir):
  direction.safetensors   the chosen direction ("direction", (d_model,)) with its position and layer;
                          absent when the filters discarded every candidate (the rest is still written)
  candidates.safetensors  every candidate ("directions", (n_eoi, n_layers, d_model)) and both means
  scores.json             bypass / induce / kl of every candidate, why each was discarded
  summary.json            the choice, the baseline metrics, prompt counts, options, the model
  scores.png              the three scores over layers, one line per eoi position
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from moeformer.publish import staged_dir
from moeformer.refusal.directions import Candidates, candidate_directions
from moeformer.refusal.instructions import sample_instructions
from moeformer.refusal.lm import ChatLM, RefusalError
from moeformer.refusal.openers import RefusalOpeners, check_metric_choice, resolve_openers
from moeformer.refusal.selection import NoDirectionChosen, Selection, check_manual, select_direction
from moeformer.results import check_output

DIRECTION_FILE = "direction.safetensors"
CANDIDATES_FILE = "candidates.safetensors"


@dataclass
class ExtractOptions:
    n_train: int = 128  # per side, as in the paper
    n_val: int = 32
    batch_size: int = 32
    seed: int = 0
    filter_train: bool = True
    refusal_tokens: list[str] | None = None  # default: the family's (see openers.REFUSAL_TOKENS)
    refusal_openers: list[str] | None = None  # whole openers instead of first tokens (see refusal.openers)
    max_layer_fraction: float = 0.8
    kl_threshold: float = 0.1
    layer: int | None = None  # with position: take this candidate, unfiltered (only it is scored)
    position: int | None = None  # negative, among the template tokens after the instruction

    def __post_init__(self) -> None:
        if (self.layer is None) != (self.position is None):
            raise RefusalError("choosing a direction by hand needs both layer and position (--layer L --position P)")
        for name in ("n_train", "n_val", "batch_size"):
            if getattr(self, name) < 1:
                raise RefusalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.max_layer_fraction <= 1:
            raise RefusalError(f"max_layer_fraction must be in (0, 1], got {self.max_layer_fraction}")
        if self.kl_threshold <= 0:
            raise RefusalError(f"kl_threshold must be > 0, got {self.kl_threshold}")
        check_metric_choice(self.refusal_tokens, self.refusal_openers)


@dataclass
class Extraction:
    candidates: Candidates
    selection: Selection
    counts: dict[str, int]  # prompts used per split after sampling and filtering
    options: ExtractOptions
    model: dict[str, Any] = field(default_factory=dict)  # family, layers, hidden size, source


def holdout(items: Sequence[str], n_val: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): ``n_val`` instructions drawn for validation, the rest for training."""
    if len(items) <= n_val:
        raise RefusalError(f"{len(items)} instructions cannot be split into train and {n_val} validation ones")
    val = set(sample_instructions(list(range(len(items))), n_val, seed))
    return [t for i, t in enumerate(items) if i not in val], [t for i, t in enumerate(items) if i in val]


def filter_by_refusal(
    lm: ChatLM, instructions: Sequence[str], openers: RefusalOpeners, *, refused: bool, batch_size: int
) -> list[str]:
    """Keep the instructions whose refusal metric is > 0 (``refused``) or < 0 (not refused)."""
    metric = openers.metric(lm, instructions, batch_size=batch_size)
    keep = metric > 0 if refused else metric < 0
    return [text for text, k in zip(instructions, keep.tolist()) if k]


def extract(
    lm: ChatLM,
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    options: ExtractOptions | None = None,
    *,
    progress: bool = False,
) -> Extraction:
    """Candidates from the train prompts, the chosen direction from the validation prompts."""
    o = options or ExtractOptions()
    manual = None if o.layer is None or o.position is None else (o.position, o.layer)
    if manual is not None:
        check_manual(*manual, lm.n_eoi, lm.n_layers)  # before any forward pass
    openers = resolve_openers(lm, o.refusal_tokens, o.refusal_openers)
    splits = {
        "harmful_train": sample_instructions(list(harmful_train), o.n_train, o.seed),
        "harmless_train": sample_instructions(list(harmless_train), o.n_train, o.seed),
        "harmful_val": sample_instructions(list(harmful_val), o.n_val, o.seed),
        "harmless_val": sample_instructions(list(harmless_val), o.n_val, o.seed),
    }
    if o.filter_train:
        for name, refused in (("harmful_train", True), ("harmless_train", False)):
            kept = filter_by_refusal(lm, splits[name], openers, refused=refused, batch_size=o.batch_size)
            if not kept:
                raise RefusalError(
                    f"filtering left no {name} prompts (the model {'refuses none' if refused else 'refuses all'} "
                    "of them by the refusal-token metric); check --refusal-tokens and the template, or --no-filter"
                )
            splits[name] = kept
    candidates = candidate_directions(
        lm, splits["harmful_train"], splits["harmless_train"], batch_size=o.batch_size, progress=progress
    )
    model = {"family": lm.family, "n_layers": lm.n_layers, "d_model": lm.d_model, "n_eoi": lm.n_eoi,
             "refusal_openers": openers.to_lists(), "refusal_opener_texts": openers.texts(lm)}  # fmt: skip
    counts = {k: len(v) for k, v in splits.items()}
    try:
        selection = select_direction(
            lm, candidates, splits["harmful_val"], splits["harmless_val"], openers,
            batch_size=o.batch_size, max_layer_fraction=o.max_layer_fraction, kl_threshold=o.kl_threshold,
            progress=progress, manual=manual,
        )  # fmt: skip
    except NoDirectionChosen as err:
        err.extraction = Extraction(candidates, err.selection, counts, o, model)
        raise
    return Extraction(candidates, selection, counts, o, model)


def save_extraction(result: Extraction, out: str | Path, *, force: bool = False, plot: bool = True) -> Path:
    """Write the files listed in the module docstring as one directory; nothing is written if anything
    fails. ``force`` replaces an old output of this project (see :func:`moeformer.results.check_output`)."""
    check_output(out, force=force)
    s, c = result.selection, result.candidates
    chosen = s.chosen
    summary = {
        "chosen": None if chosen is None else chosen.to_dict(),
        "chosen_by": None if chosen is None else s.chosen_by,
        "direction_norm": None if s.direction is None else float(s.direction.norm()),
        "baseline_refusal_metric": {"harmful_val": s.baseline_harmful, "harmless_val": s.baseline_harmless},
        "counts": result.counts,
        "options": asdict(result.options),
        "model": result.model,
    }
    with staged_dir(out, force=force) as tmp:  # files in it are fsynced when it is published
        if chosen is not None and s.direction is not None:  # none when every candidate was filtered out
            meta = {
                "position": str(chosen.position),
                "layer": str(chosen.layer),
                "family": result.model.get("family", ""),
            }
            safetensors.torch.save_file(
                {"direction": s.direction.contiguous()}, str(tmp / DIRECTION_FILE), metadata=meta
            )
        safetensors.torch.save_file(
            {"directions": c.directions.contiguous(), "harmful_mean": c.harmful_mean.contiguous(),
             "harmless_mean": c.harmless_mean.contiguous()},
            str(tmp / CANDIDATES_FILE),
        )  # fmt: skip
        (tmp / "scores.json").write_text(json.dumps([x.to_dict() for x in s.scores], indent=1), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        if plot:
            from moeformer.refusal.plots import plot_scores

            plot_scores(s.scores, tmp / "scores.png", chosen=chosen)
    return Path(out)


def load_harmless_mean(path: str | Path) -> Tensor:
    """The harmless mean activation (d_model,) at the chosen direction's position and layer, from an
    extract output directory (direction.safetensors' metadata + candidates.safetensors)."""
    path = Path(path)
    if not (path / DIRECTION_FILE).is_file() or not (path / CANDIDATES_FILE).is_file():
        raise RefusalError(f"{path}: the harmless mean comes from an extract output directory ({DIRECTION_FILE} "
                           f"and {CANDIDATES_FILE}); a direction file alone does not hold it")  # fmt: skip
    with safetensors.safe_open(str(path / DIRECTION_FILE), "pt") as f:
        meta = f.metadata() or {}
    with safetensors.safe_open(str(path / CANDIDATES_FILE), "pt") as f:
        means = f.get_tensor("harmless_mean")  # (n_eoi, n_layers, d_model)
    if "position" not in meta or "layer" not in meta:
        raise RefusalError(f"{path / DIRECTION_FILE}: no position / layer in its metadata")
    return means[means.shape[0] + int(meta["position"]), int(meta["layer"])].float()


def load_direction(path: str | Path) -> tuple[Tensor, int | None]:
    """(direction, layer) from an extraction directory or a direction .safetensors / .pt file."""
    path = Path(path)
    file = path / DIRECTION_FILE if path.is_dir() else path
    if not file.is_file():
        raise RefusalError(f"{path}: no direction file (expected a directory with {DIRECTION_FILE} or a file)")
    if file.suffix == ".pt":
        direction, layer = torch.load(file, map_location="cpu", weights_only=True), None
    else:
        try:
            with safetensors.safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
                if "direction" not in f.keys():
                    raise RefusalError(f"{file}: no tensor named 'direction' (found {list(f.keys())})")
                direction = f.get_tensor("direction")
        except safetensors.SafetensorError as err:
            raise RefusalError(f"{file}: unreadable safetensors file ({err})") from None
        layer = int(meta["layer"]) if "layer" in meta else None
    if not isinstance(direction, Tensor):
        raise RefusalError(f"{file}: does not hold a tensor")
    return direction.float(), layer
