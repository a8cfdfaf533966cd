"""Command line for the refusal direction (`moeformer refusal ...`): parses, calls moeformer.refusal, prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeformer.refusal.run import EditChoice, InstructionFiles, ModelSource


def _source(args: argparse.Namespace) -> ModelSource:
    from moeformer.refusal.run import ModelSource

    return ModelSource(path=args.model, template=args.template, dtype=args.dtype, device=args.device)


def _files(args: argparse.Namespace) -> InstructionFiles:
    from moeformer.refusal.run import InstructionFiles

    return InstructionFiles(harmful=args.harmful, harmless=args.harmless, field=args.field,
                            harmful_val=getattr(args, "harmful_val", None),
                            harmless_val=getattr(args, "harmless_val", None))  # fmt: skip


def _score(args: argparse.Namespace) -> int:
    from moeformer.refusal.run import score_file

    score = score_file(args.file, substrings_file=args.substrings)
    if args.json:
        print(json.dumps(score.to_dict(), ensure_ascii=False))
    else:
        print(f"refusal score: {score.refusal_score:.3f} ({score.n_refused} of {score.n} completions refuse)")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from moeformer.refusal.extract import ExtractOptions
    from moeformer.refusal.run import run_extract

    options = ExtractOptions(
        n_train=args.n_train, n_val=args.n_val, batch_size=args.batch_size, seed=args.seed,
        filter_train=not args.no_filter, refusal_tokens=args.refusal_tokens, refusal_openers=args.refusal_openers,
        max_layer_fraction=args.max_layer_fraction, kl_threshold=args.kl_threshold, layer=args.layer,
        position=args.position,
    )  # fmt: skip
    done = run_extract(_source(args), _files(args), args.out, options, force=args.force, progress=not args.quiet)
    s = done.result.selection
    c, norm = s.chosen, float(s.direction.norm())
    how = "chosen by hand (no filter applied)" if s.chosen_by == "hand" else "chosen direction"
    print(f"{how}: position {c.position}, layer {c.layer} of {done.n_layers} "
          f"(bypass {c.bypass:.3f}, induce {c.induce:.3f}, kl {c.kl:.4f}; norm {norm:.3g})")  # fmt: skip
    print(f"baseline refusal metric: harmful {s.baseline_harmful:.3f}, harmless {s.baseline_harmless:.3f}")
    print(f"wrote {done.out}/ (direction.safetensors, candidates.safetensors, scores.json, summary.json, scores.png)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moeformer.refusal.run import run_eval

    done = run_eval(
        _source(args), _files(args), args.direction, layer=args.layer, n=args.n, seed=args.seed,
        conditions=args.conditions, substrings_file=args.substrings, loss_texts_file=args.loss_texts,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out=args.out, force=args.force,
        progress=not args.quiet,
    )  # fmt: skip
    print(done.report.table())
    if done.written:
        print(f"wrote {args.out}/ ({', '.join(done.written)}; eval.json holds every completion)")
    return 0


def _experts(args: argparse.Namespace) -> int:
    from moeformer.refusal.run import run_experts

    report, written = run_experts(
        _source(args), _files(args), args.direction, args.out, n=args.n, seed=args.seed, top=args.top,
        draws=args.draws, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        extra_phrases_file=args.extra_phrases, force=args.force, progress=not args.quiet,
    )  # fmt: skip
    print(report.table())
    print(f"wrote {args.out}/ ({', '.join(written)})")
    return 0


def _edit_choice(args: argparse.Namespace) -> EditChoice:
    from moeformer.refusal.edits import StrengthKernel
    from moeformer.refusal.lm import RefusalError
    from moeformer.refusal.run import EditChoice

    kernel = None
    if args.kernel:
        pairs = [item.partition("=") for item in args.kernel]
        allowed = ("peak_layer", "width", "peak", "minimum")
        bad = [k for k, sep, v in pairs if not sep or k not in allowed]
        if bad:
            raise RefusalError(f"--kernel takes KEY=VALUE with keys {', '.join(allowed)}; got {', '.join(bad)}")
        try:
            kernel = StrengthKernel(**{k: float(v) for k, _, v in pairs})
        except (TypeError, ValueError) as err:
            raise RefusalError(f"--kernel: {err} (needs at least peak_layer=L width=W)") from None
    return EditChoice(method=args.method, kernel=kernel)


def _orthogonalize(args: argparse.Namespace) -> int:
    from moeformer.refusal.run import run_orthogonalize

    if args.stream and args.as_lora:
        from moeformer.refusal.lm import RefusalError

        raise RefusalError("--stream and --as-lora are exclusive: the adapter is computed from the loaded model")
    if args.stream:
        return _stream_orthogonalize(args)
    if args.as_lora:
        from moeformer.refusal.run import run_lora

        out = run_lora(_source(args), args.direction, args.out, force=args.force, edit=_edit_choice(args))
        print(f"wrote {out}/ (a PEFT LoRA adapter, rank 1: peft.PeftModel.from_pretrained(base_model, '{out}'))")
        return 0
    done = run_orthogonalize(_source(args), args.direction, args.out, force=args.force, edit=_edit_choice(args))
    result = done.result
    check = ("not checked: a strength kernel leaves part of the direction" if result.leak is None
             else f"largest residual component left along the direction: {result.leak:.2e}")  # fmt: skip
    print(f"orthogonalized ({result.method}) {len(result.edited)} tensors"
          f"{' (untied the embeddings)' if result.untied else ''}; {check}")  # fmt: skip
    print(f"wrote {done.out}")
    return 0


def _stream_orthogonalize(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from moeformer.refusal.run import run_stream_orthogonalize

    with tqdm(desc="shards", unit="shard", disable=args.quiet) as bar:
        done = run_stream_orthogonalize(args.model, args.direction, args.out, force=args.force,
                                        edit=_edit_choice(args), progress=lambda _: bar.update())  # fmt: skip
    check = ("a strength kernel leaves part of the direction" if done.leak is None else
             f"largest |cos| between the direction and what an edited tensor can write: {done.leak:.2e}")  # fmt: skip
    print(f"orthogonalized ({args.method}) {len(done.edited)} tensors in {done.shards} shards, one at a time "
          f"(largest {done.largest_shard_bytes / 2**20:,.0f} MiB){' (untied the embeddings)' if done.untied else ''}; "
          f"{check} (the model was never loaded, so the residual-stream check did not run)")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from moeformer.refusal.run import run_tune
    from moeformer.refusal.tune import TuneOptions

    options = TuneOptions(trials=args.trials, kl_budget=args.kl_budget, seed=args.seed, batch_size=args.batch_size,
                          search_layer=args.search_layer)  # fmt: skip
    tuned = run_tune(_source(args), _files(args), args.direction, args.out, options, n_val=args.n_val,
                     refusal_tokens=args.refusal_tokens, refusal_openers=args.refusal_openers,
                     progress=not args.quiet)  # fmt: skip
    print((args.out / "pareto.md").read_text(encoding="utf-8"))
    if tuned.best is None:
        print(f"no trial kept the KL within {args.kl_budget}: raise --kl-budget or run more --trials")
        return 1
    b = tuned.best
    p = b["params"]
    print(f"chosen: trial {b['number']} (bypass {b['bypass']:.3f}, kl {b['kl']:.4f}); apply it with:")
    kernel = f"peak_layer={p['peak_layer']:.6g} width={p['width']:.6g} peak={p['peak']:.6g} minimum={p['minimum']:.6g}"
    print(f"  moeformer refusal orthogonalize {args.model} --direction {args.out} --kernel {kernel} --out EDITED")
    print(f"wrote {args.out}/ (tune.json, pareto.md, pareto.png, direction.safetensors; study.db to resume)")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a Hugging Face model directory or a moeformer checkpoint")
    p.add_argument("--template", help="prompt template with {instruction}, for models without a chat template "
                   "(default: the tokenizer's chat template; moeformer checkpoints need one)")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype for Hugging Face models (default float32)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default cpu)")


def _instruction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harmful", required=True, metavar="FILE", help="JSON / JSONL / CSV / text file of instructions")
    p.add_argument("--harmless", required=True, metavar="FILE", help="the same, of harmless instructions")
    p.add_argument("--field", help="the field holding the instruction in JSON/CSV records (default: instruction)")
    p.add_argument("--seed", type=int, default=0, help="seed of the instruction sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _openers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refusal-openers", nargs="+", metavar="TEXT",
                   help="whole refusal openers as the model writes them (e.g. ' Sorry' ' I cannot'): the "
                        "metric is the probability of beginning with one (default: none; first tokens)")  # fmt: skip


def _out_args(p: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    p.add_argument("--out", required=required, type=Path, help=f"{what} (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out that this tool (or transformers) "
                   "wrote; any other directory is refused")  # fmt: skip


def add_refusal_commands(sub: argparse._SubParsersAction) -> None:
    """Add `refusal` and its subcommands to the top-level subparsers of the moeformer CLI."""
    refusal = sub.add_parser("refusal", help="refusal direction tools (Arditi et al. 2024)")
    commands = refusal.add_subparsers(dest="refusal_command", required=True)

    ex = commands.add_parser("extract", help="find the refusal direction: candidates, scores, the chosen one")
    _model_args(ex)
    _instruction_args(ex)
    ex.add_argument("--harmful-val", metavar="FILE", help="validation instructions (default: held out of --harmful)")
    ex.add_argument("--harmless-val", metavar="FILE", help="validation instructions (default: held out of --harmless)")
    _out_args(ex, required=True, what="output directory")
    ex.add_argument("--n-train", type=int, default=128, help="instructions per side for the means (default 128, "
                    "the paper's)")  # fmt: skip
    ex.add_argument("--n-val", type=int, default=32, help="instructions per side to choose with (default 32)")
    ex.add_argument("--refusal-tokens", nargs="+", metavar="TEXT",
                    help="first tokens of refusals (default: I, and As for Qwen)")  # fmt: skip
    _openers_arg(ex)
    ex.add_argument("--no-filter", action="store_true",
                    help="keep every train prompt, not only those the model treats as their side")  # fmt: skip
    ex.add_argument("--kl-threshold", type=float, default=0.1,
                    help="drop candidates whose KL on harmless prompts exceeds this (default 0.1)")  # fmt: skip
    ex.add_argument("--max-layer-fraction", type=float, default=0.8,
                    help="drop candidates from layers beyond this fraction of the depth (default 0.8)")  # fmt: skip
    ex.add_argument("--layer", type=int, help="with --position: take the candidate at this layer by hand, "
                    "unfiltered (only it is scored); default: the paper's filters choose")  # fmt: skip
    ex.add_argument("--position", type=int, help="with --layer: which template token after the instruction, "
                    "counted from the end (-1 = last); default: none")  # fmt: skip
    ex.set_defaults(run=_extract)

    ev = commands.add_parser("eval", help="completions and refusal scores under each intervention")
    _model_args(ev)
    _instruction_args(ev)
    ev.add_argument("--direction", required=True, help="an extract output directory or a direction .safetensors")
    ev.add_argument("--layer", type=int, help="layer for activation addition (default: the direction's)")
    ev.add_argument("--n", type=int, default=32, help="instructions per side (default 32)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="length of each greedy completion (default 64)")
    ev.add_argument("--conditions", nargs="+", default=["baseline", "ablation", "actadd", "orthogonalized"],
                    metavar="NAME", help="conditions to run (default: all four)")  # fmt: skip
    ev.add_argument("--substrings", metavar="FILE", help="refusal phrases, one per line (default: the paper's)")
    ev.add_argument("--loss-texts", metavar="FILE", help="texts for the loss column (default: the harmless prompts)")
    _out_args(ev, required=False, what="write eval.json (every completion), eval.md and routing.png into this "
              "directory (default: print the table only)")  # fmt: skip
    ev.set_defaults(run=_eval)

    exp = commands.add_parser("experts", help="MoE models: which experts carry refusal (routing, writes along "
                              "the direction, expert masking against a random control)")  # fmt: skip
    _model_args(exp)
    _instruction_args(exp)
    exp.add_argument("--direction", required=True, help="an extract output directory or a direction .safetensors")
    exp.add_argument("--n", type=int, default=64, help="instructions per side (default 64)")
    exp.add_argument("--top", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                     help="experts taken out of routing per layer (default 1 2 4 8)")  # fmt: skip
    exp.add_argument("--draws", type=int, default=3, help="random-expert control draws per N (default 3)")
    exp.add_argument("--max-new-tokens", type=int, default=32, help="length of each greedy completion (default 32)")
    exp.add_argument("--extra-phrases", metavar="FILE", help="more refusal phrases, one per line, scored in a second "
                     "column (a model's own refusals the paper's list misses; default: none)")  # fmt: skip
    _out_args(exp, required=True, what="experts.json, experts.md and three pictures")
    exp.set_defaults(run=_experts)

    orth = commands.add_parser("orthogonalize", help="bake the ablation into the weights; write a new model")
    _model_args(orth)
    orth.add_argument("--direction", required=True, help="an extract output directory or a direction .safetensors")
    _out_args(orth, required=True, what="new model directory, never the source or inside it")
    orth.add_argument("--stream", action="store_true", help="edit a Hugging Face safetensors checkpoint shard "
                      "by shard without loading the model (memory: about one shard; --template, --dtype and "
                      "--device are not used)")  # fmt: skip
    orth.add_argument("--quiet", action="store_true", help="no progress bar")
    orth.add_argument("--as-lora", action="store_true", help="write the edit as a rank-1 PEFT LoRA adapter for "
                      "the unmodified model instead of a full copy (Hugging Face models without fused experts or "
                      "writer biases; default: a full copy)")  # fmt: skip
    orth.add_argument("--method", default="orthogonal", choices=["orthogonal", "projected", "norm-preserving"],
                      help="orthogonal: the paper's edit; projected: remove only r's part orthogonal to the harmless "
                      "mean (needs an extract directory as --direction); norm-preserving: then restore every edited "
                      "vector's norm (default orthogonal)")  # fmt: skip
    orth.add_argument("--kernel", nargs="+", metavar="KEY=VALUE", help="edit strength over depth: peak_layer=L "
                      "width=W [peak=1] [minimum=0]; strength falls linearly from peak at L to minimum at W layers "
                      "away, 0 beyond (default: full strength everywhere)")  # fmt: skip
    orth.set_defaults(run=_orthogonalize)

    tn = commands.add_parser("tune", help="search the edit's per-layer strength (Optuna TPE) under a KL budget")
    _model_args(tn)
    _instruction_args(tn)
    tn.add_argument("--harmful-val", metavar="FILE", help="validation instructions (default: held out of --harmful)")
    tn.add_argument("--harmless-val", metavar="FILE", help="validation instructions (default: held out of --harmless)")
    tn.add_argument("--direction", required=True, help="an extract output directory (its candidates are searched)")
    tn.add_argument("--out", required=True, type=Path, help="search directory: new, or an earlier search's, "
                    "to resume it")  # fmt: skip
    tn.add_argument("--trials", type=int, default=50, help="trials in all, counting earlier ones (default 50)")
    tn.add_argument("--kl-budget", type=float, default=0.1, help="largest mean KL on harmless prompts (default 0.1)")
    tn.add_argument("--n-val", type=int, default=32, help="validation instructions per side (default 32)")
    tn.add_argument("--search-layer", action="store_true", help="also choose the candidate direction's layer "
                    "(default: the extracted one)")  # fmt: skip
    tn.add_argument("--refusal-tokens", nargs="+", metavar="TEXT", help="first tokens of refusals (default: the "
                    "model family's, as extract)")  # fmt: skip
    _openers_arg(tn)
    tn.set_defaults(run=_tune)

    score = commands.add_parser("score", help="the fraction of completions that contain a refusal phrase")
    score.add_argument("file", metavar="FILE", help='JSON list (or .jsonl) of {"prompt", "response"} objects')
    score.add_argument("--json", action="store_true", help="print one JSON object with each item's label")
    score.add_argument("--substrings", metavar="FILE", help="refusal phrases, one per line (default: the paper's)")
    score.set_defaults(run=_score)
