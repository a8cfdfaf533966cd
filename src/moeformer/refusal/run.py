"""The commands behind ``moeformer refusal extract|eval|orthogonalize|tune|score``, end to end.

Each reads and checks every input file (instructions, direction, phrases) and its output
directory before the model is loaded, so bad input fails in a second rather than after minutes
of loading; computes; and publishes ``out`` as one directory through the writers of
:mod:`moeformer.refusal.extract`, :mod:`~moeformer.refusal.evaluation` and
:mod:`~moeformer.refusal.orthogonalize` (an existing ``out`` is replaced only with ``force`` and
only when this project wrote it, see :mod:`moeformer.results`):

    run_extract        -> direction.safetensors, candidates.safetensors, scores.json, summary.json, scores.png
    run_eval           -> eval.json, eval.md, routing.png (MoE models only), when ``out`` is given
    run_orthogonalize  -> a new model directory in the source's format
    run_stream_orthogonalize -> the same for a transformers safetensors checkpoint, shard by shard,
                          without loading the model (models larger than memory)
    run_lora           -> the same edit as a rank-1 PEFT LoRA adapter directory
    run_tune           -> a resumable Optuna search of the edit's per-layer strengths (tune.json, ...)
    score_file         -> nothing written

Each returns what it computed and wrote; the caller decides what to show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from moeformer.refusal.edits import Method, StrengthKernel, check_method
from moeformer.refusal.evaluation import CONDITIONS, EvalReport, evaluate, save_evaluation
from moeformer.refusal.expert_run import ExpertReport, save_expert_report, study_experts
from moeformer.refusal.extract import (
    CANDIDATES_FILE,
    Extraction,
    ExtractOptions,
    extract,
    holdout,
    load_direction,
    load_harmless_mean,
    save_extraction,
)
from moeformer.refusal.instructions import load_instructions, sample_instructions
from moeformer.refusal.lm import ChatLM, RefusalError
from moeformer.refusal.loading import check_hidden_size, check_output_path, load_chat_lm
from moeformer.refusal.lora import save_lora
from moeformer.refusal.openers import check_metric_choice, resolve_openers
from moeformer.refusal.orthogonalize import Orthogonalized, orthogonalize, save_model
from moeformer.refusal.routing import routing_report
from moeformer.refusal.scoring import (
    REFUSAL_SUBSTRINGS,
    RefusalScore,
    load_completions,
    load_substrings,
    score_completions,
)
from moeformer.refusal.selection import NoDirectionChosen
from moeformer.refusal.streaming import StreamedEdit, stream_orthogonalize
from moeformer.refusal.tune import Tuned, TuneOptions, tune
from moeformer.results import check_output

# Harmless prompts on which `orthogonalize` verifies that nothing writes along the direction any more.
CHECK_PROMPTS = ["Write a short poem about the sea.", "How do I bake bread?", "Explain how tides work."]


@dataclass(kw_only=True)
class ModelSource:
    """Where a model comes from and how to load it (see :func:`moeformer.refusal.loading.load_chat_lm`)."""

    path: str | Path  # a Hugging Face model directory or a moeformer checkpoint / run directory
    template: str | None = None  # prompt template with {instruction}; None: the tokenizer's chat template
    dtype: str = "float32"
    device: str = "cpu"


@dataclass(kw_only=True)
class InstructionFiles:
    """The harmful and harmless instruction files, with optional separate validation files."""

    harmful: str | Path
    harmless: str | Path
    harmful_val: str | Path | None = None  # None: held out of ``harmful``
    harmless_val: str | Path | None = None
    field: str | None = None  # the field holding the instruction in JSON/CSV records


@dataclass
class ExtractDone:
    """What ``run_extract`` chose and where it wrote it."""

    result: Extraction
    out: Path
    n_layers: int  # the model's depth, for reading the chosen layer


@dataclass
class EvalDone:
    """The table of ``run_eval`` and the files written (empty without ``out``)."""

    report: EvalReport
    written: list[str]


@dataclass
class OrthogonalizeDone:
    """What ``run_orthogonalize`` edited and where the new model is."""

    result: Orthogonalized
    out: Path


def instruction_sets(files: InstructionFiles, n_val: int, seed: int) -> dict[str, list[str]]:
    """``{side}_train`` and ``{side}_val`` for both sides; without a validation file, ``n_val`` instructions
    are held out of the side's file (seeded). Every file is read here, before any model, so bad ones fail fast."""
    sets = {}
    for side in ("harmful", "harmless"):
        items = load_instructions(getattr(files, side), field=files.field)
        val_file = getattr(files, f"{side}_val")
        if val_file:
            sets[f"{side}_train"], sets[f"{side}_val"] = items, load_instructions(val_file, field=files.field)
        else:
            sets[f"{side}_train"], sets[f"{side}_val"] = holdout(items, n_val, seed)
    return sets


def run_extract(
    source: ModelSource,
    files: InstructionFiles,
    out: str | Path,
    options: ExtractOptions,
    *,
    force: bool = False,
    progress: bool = False,
) -> ExtractDone:
    """Find the refusal direction of ``source`` and write the extraction files to ``out``."""
    sets = instruction_sets(files, options.n_val, options.seed)
    check_output(out, force=force, source=source.path)  # before the long part
    lm = _load(source)
    try:
        result = extract(lm, sets["harmful_train"], sets["harmless_train"], sets["harmful_val"],
                         sets["harmless_val"], options, progress=progress)  # fmt: skip
    except NoDirectionChosen as err:
        if not isinstance(err.extraction, Extraction):
            raise
        save_extraction(err.extraction, out, force=force)  # the scores are worth keeping: pick one by hand
        best = err.suggestion(lm.n_layers, options.max_layer_fraction)
        hint = "" if best is None else (
            f"; the lowest bypass score below the layer cutoff is position {best.position}, layer {best.layer} "
            f"(bypass {best.bypass:.3g}, induce {best.induce:.3g}, kl {best.kl:.3g})"
        )  # fmt: skip
        raise RefusalError(
            f"{err}. Wrote {out}/ anyway (candidates.safetensors, scores.json, summary.json, scores.png; no "
            f"direction.safetensors): to take a candidate by hand, run extract again with --layer L --position P"
            f"{hint}"
        ) from None
    return ExtractDone(result, save_extraction(result, out, force=force), lm.n_layers)


def run_eval(
    source: ModelSource,
    files: InstructionFiles,
    direction_path: str | Path,
    *,
    layer: int | None = None,
    n: int = 32,
    seed: int = 0,
    conditions: Sequence[str] = CONDITIONS,
    substrings_file: str | Path | None = None,
    loss_texts_file: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = False,
) -> EvalDone:
    """Completions and refusal scores of ``n`` instructions per side under each condition; with ``out``,
    also eval.json, eval.md and (for an MoE model) routing.png. ``layer`` defaults to the direction's."""
    direction, saved_layer = load_direction(direction_path)
    check_hidden_size(source.path, direction)
    layer = layer if layer is not None else saved_layer
    harmful = sample_instructions(load_instructions(files.harmful, field=files.field), n, seed)
    harmless = sample_instructions(load_instructions(files.harmless, field=files.field), n, seed)
    substrings = load_substrings(substrings_file) if substrings_file else REFUSAL_SUBSTRINGS
    loss_texts = load_instructions(loss_texts_file) if loss_texts_file else None
    if out:
        check_output(out, force=force, source=source.path)  # before the long part
    lm = _load(source)
    report = evaluate(lm, direction, layer, harmful, harmless, conditions=conditions, loss_texts=loss_texts,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, substrings=substrings,
                      progress=progress)  # fmt: skip
    if not out:
        return EvalDone(report, [])
    routing = [r.to_dict() for r in routing_report(lm, harmful, harmless, direction)] if lm.router_sites() else None
    return EvalDone(report, save_evaluation(report, out, routing=routing, force=force))


@dataclass(frozen=True)
class EditChoice:
    """Which edit ``orthogonalize`` makes (see :mod:`moeformer.refusal.edits`)."""

    method: Method = "orthogonal"
    kernel: StrengthKernel | None = None

    def harmless_mean(self, direction_path: str | Path) -> Tensor | None:
        """The harmless mean the ``projected`` method needs, read from the extract directory; else None."""
        check_method(self.method)
        return load_harmless_mean(direction_path) if self.method == "projected" else None


def run_orthogonalize(
    source: ModelSource,
    direction_path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    edit: EditChoice = EditChoice(),
) -> OrthogonalizeDone:
    """Bake the ablation of the direction into a copy of ``source``'s weights, checked on CHECK_PROMPTS,
    and write it to ``out`` (never the source or inside it)."""
    lm, direction, mean = _edit_inputs(source, direction_path, out, force, edit)
    result = orthogonalize(lm, direction, CHECK_PROMPTS, method=edit.method, kernel=edit.kernel, harmless_mean=mean)
    return OrthogonalizeDone(result, save_model(lm, out, source=source.path, force=force))


def _edit_inputs(
    source: ModelSource, direction_path: str | Path, out: str | Path, force: bool, edit: EditChoice
) -> tuple[ChatLM, Tensor, Tensor | None]:
    """(model, direction, harmless mean or None) for an edit written to ``out``; every input and the
    output are checked before the model is read."""
    check_output_path(source.path, out)
    direction, _ = load_direction(direction_path)
    check_hidden_size(source.path, direction)
    mean = edit.harmless_mean(direction_path)
    check_output(out, force=force, source=source.path, model_output=True)
    return _load(source), direction, mean


def run_lora(
    source: ModelSource,
    direction_path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    edit: EditChoice = EditChoice(),
) -> Path:
    """``run_orthogonalize`` written as a PEFT LoRA adapter for the unmodified model (:mod:`moeformer.refusal.lora`)."""
    lm, direction, mean = _edit_inputs(source, direction_path, out, force, edit)
    return save_lora(lm, direction, out, source=source.path, force=force, method=edit.method, kernel=edit.kernel,
                     harmless_mean=mean, check_prompts=CHECK_PROMPTS)  # fmt: skip


def run_tune(
    source: ModelSource,
    files: InstructionFiles,
    direction_dir: str | Path,
    out: str | Path,
    options: TuneOptions,
    *,
    n_val: int = 32,
    refusal_tokens: Sequence[str] | None = None,
    refusal_openers: Sequence[str] | None = None,
    progress: bool = False,
) -> Tuned:
    """Search the strength kernel on validation prompts (:mod:`moeformer.refusal.tune`); resumable in ``out``."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise RefusalError("refusal tune needs the optuna package: pip install 'moeformer[tune]'") from None
    direction_dir = Path(direction_dir)
    if not (direction_dir / CANDIDATES_FILE).is_file():
        raise RefusalError(f"{direction_dir}: tune needs an extract output directory (with {CANDIDATES_FILE})")
    sets = instruction_sets(files, n_val, options.seed)
    harmful = sample_instructions(sets["harmful_val"], n_val, options.seed)
    harmless = sample_instructions(sets["harmless_val"], n_val, options.seed)
    check_output_path(source.path, out)
    check_metric_choice(refusal_tokens, refusal_openers)
    lm = _load(source)
    return tune(lm, direction_dir, harmful, harmless, resolve_openers(lm, refusal_tokens, refusal_openers), out,
                options, progress=progress)  # fmt: skip


def run_stream_orthogonalize(
    source: str | Path,
    direction_path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    edit: EditChoice = EditChoice(),
    progress: Callable[[str], None] | None = None,
) -> StreamedEdit:
    """``run_orthogonalize`` for a transformers safetensors checkpoint that need not fit in memory:
    no model is loaded; each shard is edited and written in turn (:mod:`moeformer.refusal.streaming`)."""
    direction, _ = load_direction(direction_path)
    mean = edit.harmless_mean(direction_path)
    return stream_orthogonalize(source, out, direction, method=edit.method, kernel=edit.kernel, harmless_mean=mean,
                                force=force, progress=progress)  # fmt: skip


def run_experts(
    source: ModelSource, files: InstructionFiles, direction_path: str | Path, out: str | Path, *, n: int = 64,
    seed: int = 0, top: Sequence[int] = (1, 2, 4, 8), draws: int = 3, max_new_tokens: int = 32,
    batch_size: int = 16, extra_phrases_file: str | Path | None = None, force: bool = False, progress: bool = False,
) -> tuple[ExpertReport, list[str]]:  # fmt: skip
    """The expert study (:mod:`moeformer.refusal.experts`) on ``n`` instructions per side, its
    interventions scored on the harmful ones, written into ``out``."""
    direction, _ = load_direction(direction_path)
    check_hidden_size(source.path, direction)
    harmful = sample_instructions(load_instructions(files.harmful, field=files.field), n, seed)
    harmless = sample_instructions(load_instructions(files.harmless, field=files.field), n, seed)
    extra = load_substrings(extra_phrases_file) if extra_phrases_file else ()
    check_output(out, force=force, source=source.path)  # before the long part
    lm = _load(source)
    report = study_experts(lm, direction, harmful, harmless, top=top, draws=draws, seed=seed,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, extra_substrings=extra,
                           progress=progress)  # fmt: skip
    return report, save_expert_report(report, out, force=force)


def score_file(path: str | Path, *, substrings_file: str | Path | None = None) -> RefusalScore:
    """The refusal score of a completions file (see :mod:`moeformer.refusal.scoring`)."""
    substrings = load_substrings(substrings_file) if substrings_file else REFUSAL_SUBSTRINGS
    return score_completions(load_completions(path), substrings)


def _load(source: ModelSource) -> ChatLM:
    return load_chat_lm(source.path, template=source.template, dtype=source.dtype, device=source.device)
