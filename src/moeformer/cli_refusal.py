"""Command line for the refusal direction (`moeformer refusal ...`): parses, calls moeformer.refusal, prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHECK_PROMPTS = ["Write a short poem about the sea.", "How do I bake bread?", "Explain how tides work."]


def _score(args: argparse.Namespace) -> int:
    from moeformer.refusal.scoring import REFUSAL_SUBSTRINGS, load_completions, load_substrings, score_completions

    substrings = load_substrings(args.substrings) if args.substrings else REFUSAL_SUBSTRINGS
    score = score_completions(load_completions(args.file), substrings)
    if args.json:
        print(json.dumps(score.to_dict(), ensure_ascii=False))
    else:
        print(f"refusal score: {score.refusal_score:.3f} ({score.n_refused} of {score.n} completions refuse)")
    return 0


def _instruction_sets(args: argparse.Namespace, n_val: int) -> dict[str, list[str]]:
    """Read every instruction file before the model is loaded, so bad files fail fast."""
    from moeformer.refusal.extract import holdout
    from moeformer.refusal.instructions import load_instructions

    sets = {}
    for side in ("harmful", "harmless"):
        items = load_instructions(getattr(args, side), field=args.field)
        val_file = getattr(args, f"{side}_val", None)
        if val_file:
            sets[f"{side}_train"], sets[f"{side}_val"] = items, load_instructions(val_file, field=args.field)
        else:
            sets[f"{side}_train"], sets[f"{side}_val"] = holdout(items, n_val, args.seed)
    return sets


def _extract(args: argparse.Namespace) -> int:
    from moeformer.refusal.extract import ExtractOptions, extract, prepare_output, save_extraction
    from moeformer.refusal.loading import load_chat_lm

    options = ExtractOptions(
        n_train=args.n_train, n_val=args.n_val, batch_size=args.batch_size, seed=args.seed,
        filter_train=not args.no_filter, refusal_tokens=args.refusal_tokens,
        max_layer_fraction=args.max_layer_fraction, kl_threshold=args.kl_threshold,
    )  # fmt: skip
    sets = _instruction_sets(args, args.n_val)
    prepare_output(args.out, force=args.force)  # refuse an existing --out before the long part
    lm = load_chat_lm(args.model, template=args.template, dtype=args.dtype, device=args.device)
    result = extract(lm, sets["harmful_train"], sets["harmless_train"], sets["harmful_val"], sets["harmless_val"],
                     options, progress=not args.quiet)  # fmt: skip
    out = save_extraction(result, args.out, force=args.force)
    c, s = result.selection.chosen, result.selection
    norm = float(s.direction.norm())
    print(f"chosen direction: position {c.position}, layer {c.layer} of {lm.n_layers} "
          f"(bypass {c.bypass:.3f}, induce {c.induce:.3f}, kl {c.kl:.4f}; norm {norm:.3g})")  # fmt: skip
    print(f"baseline refusal metric: harmful {s.baseline_harmful:.3f}, harmless {s.baseline_harmless:.3f}")
    print(f"wrote {out}/ (direction.safetensors, candidates.safetensors, scores.json, summary.json, scores.png)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moeformer.refusal.evaluation import evaluate
    from moeformer.refusal.extract import load_direction, prepare_output, publish
    from moeformer.refusal.instructions import load_instructions, sample_instructions
    from moeformer.refusal.loading import check_hidden_size, load_chat_lm
    from moeformer.refusal.routing import routing_report
    from moeformer.refusal.scoring import REFUSAL_SUBSTRINGS, load_substrings

    direction, layer = load_direction(args.direction)
    check_hidden_size(args.model, direction)
    layer = args.layer if args.layer is not None else layer
    harmful = sample_instructions(load_instructions(args.harmful, field=args.field), args.n, args.seed)
    harmless = sample_instructions(load_instructions(args.harmless, field=args.field), args.n, args.seed)
    substrings = load_substrings(args.substrings) if args.substrings else REFUSAL_SUBSTRINGS
    loss_texts = load_instructions(args.loss_texts) if args.loss_texts else None
    if args.out:
        prepare_output(args.out, force=args.force)
    lm = load_chat_lm(args.model, template=args.template, dtype=args.dtype, device=args.device)
    report = evaluate(lm, direction, layer, harmful, harmless, conditions=args.conditions, loss_texts=loss_texts,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, substrings=substrings,
                      progress=not args.quiet)  # fmt: skip
    data = report.to_dict()
    if lm.router_sites():
        data["routing"] = [r.to_dict() for r in routing_report(lm, harmful, harmless, direction)]
    print(report.table())
    if args.out:
        from moeformer.refusal.plots import plot_routing

        out, tmp = prepare_output(args.out, force=args.force)
        (tmp / "eval.json").write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        (tmp / "eval.md").write_text(report.table() + "\n", encoding="utf-8")
        if "routing" in data:
            plot_routing(data["routing"], tmp / "routing.png")
        publish(tmp, out)
        print(f"wrote {out}/ (eval.json with every completion, eval.md{', routing.png' if 'routing' in data else ''})")
    return 0


def _orthogonalize(args: argparse.Namespace) -> int:
    from moeformer.refusal.extract import load_direction, prepare_output, publish
    from moeformer.refusal.loading import check_hidden_size, check_output_path, load_chat_lm
    from moeformer.refusal.orthogonalize import orthogonalize

    check_output_path(args.model, args.out)
    direction, _ = load_direction(args.direction)
    check_hidden_size(args.model, direction)
    prepare_output(args.out, force=args.force)
    lm = load_chat_lm(args.model, template=args.template, dtype=args.dtype, device=args.device)
    result = orthogonalize(lm, direction, CHECK_PROMPTS)
    out, tmp = prepare_output(args.out, force=args.force)
    lm.save(tmp)
    publish(tmp, out)
    print(f"orthogonalized {len(result.edited)} tensors{' (untied the embeddings)' if result.untied else ''}; "
          f"largest residual component left along the direction: {result.leak:.2e}")  # fmt: skip
    print(f"wrote {out}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a Hugging Face model directory or a moeformer checkpoint")
    p.add_argument("--template", help="prompt template with {instruction}, for models without a chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def _instruction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harmful", required=True, metavar="FILE", help="JSON / JSONL / CSV / text file of instructions")
    p.add_argument("--harmless", required=True, metavar="FILE")
    p.add_argument("--field", help="the field holding the instruction in JSON/CSV records (default: instruction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_refusal_commands(sub: argparse._SubParsersAction) -> None:
    """Add `refusal` and its subcommands to the top-level subparsers of the moeformer CLI."""
    refusal = sub.add_parser("refusal", help="refusal direction tools (Arditi et al. 2024)")
    commands = refusal.add_subparsers(dest="refusal_command", required=True)

    ex = commands.add_parser("extract", help="find the refusal direction: candidates, scores, the chosen one")
    _model_args(ex)
    _instruction_args(ex)
    ex.add_argument("--harmful-val", metavar="FILE", help="validation instructions (default: held out of --harmful)")
    ex.add_argument("--harmless-val", metavar="FILE")
    ex.add_argument("--out", required=True, type=Path, help="output directory (must not exist unless --force)")
    ex.add_argument("--n-train", type=int, default=128, help="instructions per side for the means (paper: 128)")
    ex.add_argument("--n-val", type=int, default=32, help="instructions per side for selection (paper: 32)")
    ex.add_argument("--refusal-tokens", nargs="+", metavar="TEXT", help="first tokens of refusals (default: I, As)")
    ex.add_argument("--no-filter", action="store_true", help="keep train prompts the model (does not) refuse")
    ex.add_argument("--kl-threshold", type=float, default=0.1)
    ex.add_argument("--max-layer-fraction", type=float, default=0.8)
    ex.add_argument("--force", action="store_true", help="replace an existing --out")
    ex.set_defaults(run=_extract)

    ev = commands.add_parser("eval", help="completions and refusal scores under each intervention")
    _model_args(ev)
    _instruction_args(ev)
    ev.add_argument("--direction", required=True, help="an extract output directory or a direction .safetensors")
    ev.add_argument("--layer", type=int, help="layer for activation addition (default: the direction's)")
    ev.add_argument("--n", type=int, default=32, help="instructions per side (default 32)")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--conditions", nargs="+", default=["baseline", "ablation", "actadd", "orthogonalized"])
    ev.add_argument("--substrings", metavar="FILE", help="refusal phrases, one per line (default: the paper's)")
    ev.add_argument("--loss-texts", metavar="FILE", help="texts for the loss column (default: the harmless prompts)")
    ev.add_argument("--out", type=Path, help="write eval.json (every completion), eval.md and routing.png here")
    ev.add_argument("--force", action="store_true")
    ev.set_defaults(run=_eval)

    orth = commands.add_parser("orthogonalize", help="bake the ablation into the weights; write a new model")
    _model_args(orth)
    orth.add_argument("--direction", required=True, help="an extract output directory or a direction .safetensors")
    orth.add_argument("--out", required=True, type=Path, help="new model directory (never the source)")
    orth.add_argument("--force", action="store_true", help="replace an existing --out")
    orth.set_defaults(run=_orthogonalize)

    score = commands.add_parser("score", help="the fraction of completions that contain a refusal phrase")
    score.add_argument("file", metavar="FILE", help='JSON list (or .jsonl) of {"prompt", "response"} objects')
    score.add_argument("--json", action="store_true", help="print one JSON object with each item's label")
    score.add_argument("--substrings", metavar="FILE", help="refusal phrases, one per line (default: the paper's)")
    score.set_defaults(run=_score)
