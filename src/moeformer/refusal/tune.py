"""Search the edit's per-layer strength kernel (and, optionally, the direction's layer) with Optuna.

Each trial proposes a :class:`~moeformer.refusal.edits.StrengthKernel` (peak_layer, width, peak,
minimum; with ``search_layer`` also which layer's candidate direction) with Optuna's TPE sampler
and scores it on validation prompts through hooks (:func:`~moeformer.refusal.interventions.ablate_partially`:
exactly what the edited weights compute, with no weights copied per trial):

- bypass: mean refusal metric (log-odds of the refusal tokens at the first generated position,
  the paper's selection score) of harmful prompts; lower = less refusal;
- kl: mean KL(baseline || edited) of the next-token distributions of harmless prompts.

Both are minimised with the constraint kl <= ``kl_budget`` (``Trial.set_constraint``); the
chosen kernel is the feasible trial of lowest bypass. The study lives in ``OUT/study.db``
(SQLite), seeded, so a stopped search resumes where it was with the same options. When it ends,
OUT gets ``tune.json`` (options, baseline, every trial, the Pareto front, the choice),
``pareto.md``, ``pareto.png`` and, for the choice, ``direction.safetensors`` to orthogonalize with
(``--kernel`` values printed by the command).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from moeformer.publish import OutputExistsError, write_bytes, write_text
from moeformer.refusal.edits import StrengthKernel
from moeformer.refusal.extract import CANDIDATES_FILE, DIRECTION_FILE
from moeformer.refusal.interventions import ablate_partially
from moeformer.refusal.lm import ChatLM, RefusalError
from moeformer.refusal.openers import RefusalOpeners
from moeformer.refusal.selection import kl_divergence, last_logits

STUDY, SETTINGS = "study.db", "settings.json"


@dataclass(frozen=True)
class TuneOptions:
    trials: int = 50  # total, counting those of an earlier, interrupted search
    kl_budget: float = 0.1
    seed: int = 0
    batch_size: int = 16
    search_layer: bool = False  # also choose the layer of the candidate direction (needs candidates.safetensors)

    def __post_init__(self) -> None:
        if self.trials < 1 or self.batch_size < 1:
            raise RefusalError(f"trials and batch_size must be >= 1, got {self.trials} and {self.batch_size}")
        if not self.kl_budget > 0:
            raise RefusalError(f"the KL budget must be > 0, got {self.kl_budget}")


@dataclass
class Tuned:
    baseline_bypass: float
    trials: list[dict[str, Any]]  # number, params, bypass, kl, feasible
    pareto: list[dict[str, Any]]  # the non-dominated trials, by kl
    best: dict[str, Any] | None  # the feasible trial of lowest bypass; None if no trial met the budget

    def kernel(self) -> StrengthKernel | None:
        return None if self.best is None else StrengthKernel(**_kernel_params(self.best["params"]))


def _kernel_params(params: dict[str, Any]) -> dict[str, float]:
    return {k: params[k] for k in ("peak_layer", "width", "peak", "minimum")}


def candidate_directions_at(direction_dir: Path) -> tuple[Tensor, int, int]:
    """((n_layers, d_model) candidates at the chosen direction's position, position, chosen layer)."""
    with safetensors.safe_open(str(direction_dir / DIRECTION_FILE), "pt") as f:
        meta = f.metadata() or {}
    with safetensors.safe_open(str(direction_dir / CANDIDATES_FILE), "pt") as f:
        directions = f.get_tensor("directions")
    position, layer = int(meta["position"]), int(meta["layer"])
    return directions[directions.shape[0] + position].float().clone(), position, layer


def tune(
    lm: ChatLM,
    direction_dir: str | Path,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    openers: RefusalOpeners,
    out: str | Path,
    options: TuneOptions = TuneOptions(),
    *,
    progress: bool = False,
) -> Tuned:
    """Run (or resume) the search; see the module docstring for what is written to ``out``."""
    import optuna  # an optional dependency: imported where needed (RefusalError from the caller if absent)

    direction_dir, out = Path(direction_dir), Path(out)
    candidates, position, chosen_layer = candidate_directions_at(direction_dir)
    _prepare_out(out, {"options": asdict(options), "direction": str(direction_dir.resolve()), "family": lm.family,
                        "refusal_openers": openers.to_lists()})  # fmt: skip
    baseline = float(openers.metric(lm, harmful_val, batch_size=options.batch_size).mean())
    base_harmless = last_logits(lm, harmless_val, batch_size=options.batch_size)
    n = lm.n_layers
    usable = [layer for layer in range(n) if float(candidates[layer].norm()) > 1e-8]  # equal means: no direction

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        layer = trial.suggest_categorical("direction_layer", usable) if options.search_layer else chosen_layer
        kernel = StrengthKernel(
            peak_layer=trial.suggest_float("peak_layer", 0, n - 1),
            width=trial.suggest_float("width", 0.5, float(n)),
            peak=trial.suggest_float("peak", 0.0, 1.0),
            minimum=trial.suggest_float("minimum", 0.0, 1.0),
        )
        with ablate_partially(lm, candidates[layer], kernel.alphas(n)):
            bypass = float(openers.metric(lm, harmful_val, batch_size=options.batch_size).mean())
            harmless = last_logits(lm, harmless_val, batch_size=options.batch_size)
        kl = float(kl_divergence(base_harmless, harmless).mean())
        trial.set_constraint("kl_over_budget", kl - options.kl_budget)  # feasible when <= 0
        return bypass, kl

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=options.seed)  # reads the trials' constraints (set_constraint)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler, study_name="refusal-kernel",
                                storage=f"sqlite:///{out / STUDY}", load_if_exists=True)  # fmt: skip
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if done < options.trials:
        study.optimize(objective, n_trials=options.trials - done, show_progress_bar=progress)
    tuned = _summarise(study, options.kl_budget, baseline, chosen_layer)
    _write(out, tuned, options, candidates, position)
    return tuned


def _prepare_out(out: Path, settings: dict[str, Any]) -> None:
    """A new directory, or one an earlier search with the same settings left (to resume)."""
    stored = out / SETTINGS
    comparable = {**settings, "options": {**settings["options"], "trials": None}}
    if stored.is_file():
        before = json.loads(stored.read_text(encoding="utf-8"))
        if before != comparable:
            differ = sorted(k for k in comparable if before.get(k) != comparable[k])
            raise RefusalError(f"--out {out} holds a search with other settings ({', '.join(differ)} differ); "
                               "use another --out or the same settings to resume it")  # fmt: skip
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"--out {out} exists and is not a search of `refusal tune`; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    write_text(stored, json.dumps(comparable, indent=1))


def _summarise(study: Any, budget: float, baseline: float, chosen_layer: int) -> Tuned:
    trials = []
    for t in study.trials:
        if t.values is None:
            continue
        params = {**t.params, "direction_layer": t.params.get("direction_layer", chosen_layer)}
        trials.append({"number": t.number, "params": params, "bypass": t.values[0], "kl": t.values[1],
                       "feasible": t.values[1] <= budget})  # fmt: skip
    pareto = [t for t in trials if not any(_dominates(o, t) for o in trials)]
    feasible = [t for t in trials if t["feasible"]]
    best = min(feasible, key=lambda t: t["bypass"], default=None)
    return Tuned(baseline, trials, sorted(pareto, key=lambda t: t["kl"]), best)


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["bypass"] <= b["bypass"] and a["kl"] <= b["kl"] and (a["bypass"] < b["bypass"] or a["kl"] < b["kl"])


def _write(out: Path, tuned: Tuned, options: TuneOptions, candidates: Tensor, position: int) -> None:
    result = {"options": asdict(options), **asdict(tuned)}
    write_text(out / "tune.json", json.dumps(result, indent=1))
    rows = ["| trial | bypass | kl | peak layer | width | peak | minimum | direction layer | within budget |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in tuned.pareto:
        p = t["params"]
        rows.append(f"| {t['number']} | {t['bypass']:.3f} | {t['kl']:.4f} | {p['peak_layer']:.2f} | {p['width']:.2f} | "
                    f"{p['peak']:.2f} | {p['minimum']:.2f} | {p['direction_layer']} | {t['feasible']} |")  # fmt: skip
    head = f"Baseline bypass (no edit): {tuned.baseline_bypass:.3f}; KL budget {options.kl_budget}."
    write_text(out / "pareto.md", head + "\n\nPareto front (bypass vs KL):\n\n" + "\n".join(rows) + "\n")
    write_bytes(out / "pareto.png", _picture(tuned, options.kl_budget))
    if tuned.best is not None:
        layer = tuned.best["params"]["direction_layer"]
        buffer = safetensors.torch.save({"direction": candidates[layer].contiguous()},
                                        metadata={"position": str(position), "layer": str(layer)})  # fmt: skip
        write_bytes(out / DIRECTION_FILE, buffer)


def _picture(tuned: Tuned, budget: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for feasible, color, label in ((True, "tab:blue", "within budget"), (False, "tab:gray", "over budget")):
        pts = [t for t in tuned.trials if t["feasible"] == feasible]
        ax.scatter([t["kl"] for t in pts], [t["bypass"] for t in pts], s=14, color=color, label=label)
    ax.plot([t["kl"] for t in tuned.pareto], [t["bypass"] for t in tuned.pareto], color="tab:red", label="Pareto front")
    ax.axvline(budget, color="black", linestyle=":", label=f"KL budget {budget}")
    ax.axhline(tuned.baseline_bypass, color="tab:green", linestyle="--", label="no edit")
    if tuned.best is not None:
        ax.scatter([tuned.best["kl"]], [tuned.best["bypass"]], marker="*", s=180, color="gold", edgecolor="k",
                   label="chosen", zorder=3)  # fmt: skip
    ax.set(xlabel="KL on harmless prompts", ylabel="refusal metric on harmful prompts (bypass)",
           title="Strength-kernel search (Optuna TPE)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
