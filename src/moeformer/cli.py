"""Command line: parses arguments, calls the library, prints. No model logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moeformer.cli_inspect import add_inspect_commands
from moeformer.cli_refusal import add_refusal_commands
from moeformer.cli_train import add_train_commands
from moeformer.config import ConfigError
from moeformer.data.download import DownloadError
from moeformer.runtime import keep_freed_memory
from moeformer.train.checkpoint import CheckpointError
from moeformer.train.trainer import TrainingDiverged


def _translate(args: argparse.Namespace) -> int:
    from moeformer.inference import load_model, translate

    loaded = load_model(args.checkpoint, which=args.which)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        print("moeformer: error: nothing to translate (give TEXT arguments or lines on stdin)", file=sys.stderr)
        return 2
    for line in translate(loaded.model, loaded.tokenizers, texts, beam_size=args.beam):
        print(line)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moeformer.inference import generate, load_model

    loaded = load_model(args.checkpoint, which=args.which)
    print(
        generate(
            loaded.model,
            loaded.tokenizers,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moeformer.evaluate.checkpoint import evaluate_checkpoint

    scores = evaluate_checkpoint(args.checkpoint, args.data, which=args.which, limit=args.limit, beam_size=args.beam)
    print(json.dumps(scores, ensure_ascii=False, indent=1))
    return 0


def _data(args: argparse.Namespace) -> int:
    from moeformer.data.download import CORPORA, download

    if args.action == "list":
        for name in CORPORA:
            print(name)
        return 0
    path = download(args.name, Path(args.dest), progress=not args.quiet)
    print(path)
    return 0


def _info(args: argparse.Namespace) -> int:
    from moeformer.config import load_config
    from moeformer.models import build_model

    config = load_config(args.config).model
    model = build_model(config)
    print(model)
    print(f"\n{type(model).__name__}: {model.num_parameters():,} parameters")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from moeformer.presets import PRESETS

    for name, values in PRESETS.items():
        att = values["attention"]
        kv_heads = att.get("n_kv_heads", att["n_heads"])
        kv = f"latent={att['kv_lora_rank']}" if att.get("kind") == "mla" else f"kv_heads={kv_heads}"
        print(
            f"{name:18} {values['arch']:8} d_model={values['d_model']:<5} layers={values['n_layers']:<3} "
            f"heads={att['n_heads']:<3} {kv:<12} "
            f"d_ff={values['ffn']['d_ff']:<5} {values['norm_position']}-{values['norm']} "
            f"{values['position']} {values['ffn']['activation']}"
        )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from moeformer.interop.checkpoints import checkpoint_to_hf, hf_to_checkpoint

    to = args.to or ("moeformer" if (Path(args.source) / "config.json").exists() else "hf")
    if to == "hf":
        done = checkpoint_to_hf(args.source, args.out, which=args.which, force=args.force)
        target = f"a transformers {done.family} checkpoint (AutoModelForCausalLM.from_pretrained)"
    else:
        done = hf_to_checkpoint(args.source, args.out, force=args.force)
        target = f"a moeformer checkpoint (from {done.family})"
    print(f"wrote {done.out}: {target}, {done.parameters:,} parameters")
    if not done.tokenizer:
        print("note: no tokenizer came along (the source has no tokenizer.json form)")
    return 0


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="in a run directory (default best)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    add_train_commands(sub)

    tr = sub.add_parser("translate", help="translate TEXT arguments, or stdin lines with '-' or no TEXT")
    _checkpoint_args(tr)
    tr.add_argument("text", nargs="*")
    tr.add_argument("--beam", type=int, default=4, help="beam size; 1 is greedy (default 4)")
    tr.set_defaults(run=_translate)

    gen = sub.add_parser("generate", help="continue a prompt with a decoder-only model")
    _checkpoint_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(run=_generate)

    ev = sub.add_parser("eval", help="score a checkpoint on a parallel file (BLEU, chrF) or a text (perplexity)")
    _checkpoint_args(ev)
    ev.add_argument("--data", required=True, help="TSV/JSONL pairs for translation, plain text for an LM")
    ev.add_argument("--limit", type=int, help="use at most this many pairs / windows")
    ev.add_argument("--beam", type=int, default=1)
    ev.set_defaults(run=_eval)

    data = sub.add_parser("data", help="download public corpora (needs a network)")
    data.add_argument("action", choices=["download", "list"])
    data.add_argument("name", nargs="?", help="corpus name (see `moeformer data list`)")
    data.add_argument("--dest", default="data", help="folder to download into (default ./data)")
    data.add_argument("--quiet", action="store_true")
    data.set_defaults(run=_data)

    info = sub.add_parser("info", help="build the model of a TOML config and print its layers and size")
    info.add_argument("config")
    info.set_defaults(run=_info)
    presets = sub.add_parser("presets", help="list the named model sizes")
    presets.set_defaults(run=_presets)
    conv = sub.add_parser("convert", help="convert between a transformers checkpoint and a moeformer one")
    conv.add_argument("source", help="a transformers directory (config.json + safetensors) or a moeformer checkpoint")
    conv.add_argument("out", help="the directory to write")
    conv.add_argument(
        "--to", choices=["hf", "moeformer"], help="direction (default: moeformer if SOURCE has config.json, else hf)"
    )
    conv.add_argument("--which", choices=["best", "latest"], default="best", help="in a run directory (default best)")
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.set_defaults(run=_convert)
    add_refusal_commands(sub)
    add_inspect_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "data" and args.action == "download" and not args.name:
        parser.error("data download needs a corpus NAME (see `moeformer data list`)")
    if args.command == "translate" and args.text == ["-"]:
        args.text = []
    # The command line decides for its user: freed memory is kept for reuse on CPU (an MoE step
    # frees and maps tens of MB at a time; see moeformer.runtime). Importing the library does not.
    keep_freed_memory()
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"moeformer: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, CheckpointError, TrainingDiverged, DownloadError) as err:
        print(f"moeformer: error: {err}", file=sys.stderr)
        return 1
