"""Where the commands that write results (``refusal``, ``inspect``, ``report``) may write, checked
before any model is loaded.

Every such output is one directory published by :func:`moeformer.publish.staged_dir` (assembled
in a temporary sibling, fsynced, swapped in; an old one is deleted only once the new one is in
place). ``--force`` replaces only a directory this project or transformers wrote
(:func:`moeformer.publish.check_replaceable`), and never

- the source model, or a directory that holds it (replacing it would delete the model);
- for outputs that are results and not models, a model or run directory: ``--force`` there would
  swap a trained model for a few pictures or JSON files.
"""

from __future__ import annotations

from pathlib import Path

from moeformer.checkpoint_io import SIDECAR
from moeformer.publish import OutputExistsError, check_replaceable

# A directory holding one of these is a model (transformers or moeformer) or a training run.
MODEL_OR_RUN = ("config.json", SIDECAR, "latest", "best", "run.json", "metrics.jsonl", "checkpoints")


def holds_model(path: Path) -> bool:
    """Whether the directory ``path`` is a model or a run directory (by its files)."""
    return path.is_dir() and any((path / name).exists() for name in MODEL_OR_RUN)


def check_output(
    out: str | Path, *, force: bool, source: str | Path | None = None, model_output: bool = False
) -> None:
    """Refuse ``out`` (an :class:`~moeformer.publish.OutputExistsError`) unless it may be written.

    ``source``: the model read; ``out`` may not be it or hold it. ``model_output``: ``out`` will be
    a model (``refusal orthogonalize``), so an existing model directory is ours to replace with ``force``.
    """
    out = Path(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise OutputExistsError(f"--out {out} is or holds the source model {source}; the source is never modified")
    check_replaceable(out, force=force)
    if not model_output and holds_model(out):
        raise OutputExistsError(
            f"--out {out} holds a model or a training run; this command writes results, not a model, and will "
            "not replace it. Choose another output directory"
        )
