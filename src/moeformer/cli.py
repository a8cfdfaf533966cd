"""Command line: the inference commands (translate, generate, eval, convert, data, info, presets),
the top-level parser, and the error handling that turns expected failures into one line on stderr.

Training, refusal and inspection commands live in ``cli_train``, ``cli_refusal`` and ``cli_inspect``.
Results go to stdout; notes (an input translated sentence by sentence, generation stopped at the
model's limit, no tokenizer in a converted checkpoint) go to stderr, so piped output stays clean.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from safetensors import SafetensorError

from moeformer.checkpoint_io import CheckpointError
from moeformer.cli_help import LayoutFormatter, Parser, positive_int
from moeformer.cli_inspect import add_inspect_commands
from moeformer.cli_refusal import add_refusal_commands
from moeformer.cli_train import add_train_commands
from moeformer.config import ConfigError
from moeformer.data.download import DownloadError
from moeformer.runtime import keep_freed_memory
from moeformer.train.trainer import TrainingDiverged

DESCRIPTION = """\
Train, use and study Transformers and Mixture-of-Experts models (DeepSeekMoE and friends).

  moeformer demo                        train a small English->Chinese translator (offline, minutes)
  moeformer train CONFIG.toml           train a model described by a TOML config
  moeformer translate RUN "text" ...    translate with a trained translation model (or stdin lines)
  moeformer generate RUN --prompt TEXT  continue a prompt with a decoder-only language model
  moeformer eval RUN --data FILE        BLEU and chrF, or perplexity, on a file
  moeformer convert SOURCE OUT          to or from a Hugging Face transformers directory
  moeformer inspect | report | refusal  routing, attention, an HTML report, the refusal direction

RUN is a run directory (its best checkpoint) or one checkpoint directory.
`moeformer COMMAND -h` shows a command's options."""


def _note(message: str) -> None:
    print(f"moeformer: note: {message}", file=sys.stderr, flush=True)


def _stdin_lines() -> list[str]:
    """Every line of stdin, blank ones included, so output line N answers input line N."""
    return [line.rstrip("\r\n") for line in sys.stdin]


def _translate(args: argparse.Namespace) -> int:
    from moeformer.inference import load_model, require_arch, translate

    loaded = load_model(args.checkpoint, which=args.which, tokenizer=args.tokenizer)
    require_arch(loaded.model, "seq2seq", "translate")  # before waiting for stdin
    tokenizers = loaded.tokenizers
    texts = args.text or _stdin_lines()
    if not texts:
        print("moeformer: error: nothing to translate (give TEXT arguments or lines on stdin)", file=sys.stderr)
        return 2
    for line in translate(loaded.model, tokenizers, texts, beam_size=args.beam, note=_note):
        print(line)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moeformer.inference import generate, load_model

    loaded = load_model(args.checkpoint, which=args.which, tokenizer=args.tokenizer)
    text = generate(
        loaded.model,
        loaded.tokenizers,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        note=_note,
        speculative=args.speculative,
        draft_tokens=args.draft_tokens,
    )
    print(text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moeformer.inference import evaluate_checkpoint

    scores = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        which=args.which,
        limit=args.limit,
        beam_size=args.beam,
        tokenizer=args.tokenizer,
        note=_note,
    )
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
        done = checkpoint_to_hf(args.source, args.out, which=args.which, force=args.force, tokenizer=args.tokenizer)
        target = f"a transformers {done.family} checkpoint (AutoModelForCausalLM.from_pretrained)"
    else:
        done = hf_to_checkpoint(args.source, args.out, force=args.force, tokenizer=args.tokenizer)
        target = f"a moeformer checkpoint (from {done.family})"
    print(f"wrote {done.out}: {target}, {done.parameters:,} parameters")
    if not done.tokenizer:
        _note(
            "no tokenizer came along (the source has none in tokenizer.json form): the output holds weights "
            "only; give one with --tokenizer PATH here or to the commands that read text"
        )
    return 0


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory (its best checkpoint) or a checkpoint directory")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="which checkpoint of a run directory")
    _tokenizer_arg(p)


def _tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a tokenizer.json, or a directory holding one, to use instead of the checkpoint's own "
        "(needed for a weights-only checkpoint; default: the checkpoint's)",
    )


def _add_translate(sub: argparse._SubParsersAction) -> None:
    what = "translate TEXT arguments, or every stdin line (blank ones too) with '-' or no TEXT"
    tr = sub.add_parser("translate", help=what, description=what[0].upper() + what[1:] + ". Options may come "
                        "before or after the texts; an input longer than the model's limit is translated "
                        "sentence by sentence (a note on stderr says so).")  # fmt: skip
    _checkpoint_args(tr)
    tr.add_argument("text", nargs="*", help="sentences to translate, one output line each; '-' or none: stdin")
    tr.add_argument("--beam", type=positive_int, default=4, help="beam size; 1 is greedy")
    tr.set_defaults(run=_translate)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    what = "continue a prompt with a decoder-only model"
    gen = sub.add_parser("generate", help=what, description=what[0].upper() + what[1:] + ". The prompt and the "
                         "new tokens share the model's positions (max_seq_len); a note on stderr says when "
                         "generation stops there.")  # fmt: skip
    _checkpoint_args(gen)
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=positive_int, default=200, help="stop after this many new tokens")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-k", type=positive_int, help="sample from the k likeliest tokens only (default: all)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set with this mass (default: off)")
    gen.add_argument("--seed", type=int, help="random seed, for repeatable samples (default: a fresh one)")
    gen.add_argument("--speculative", action="store_true", help="draft with the model's multi-token prediction "
                     "modules ([model.mtp]) and verify with the main model: same output, fewer main passes")
    gen.add_argument("--draft-tokens", type=positive_int, help="with --speculative: tokens drafted per main pass, "
                     "1 to the model's MTP depth (default: its depth)")  # fmt: skip
    gen.set_defaults(run=_generate)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    what = "score a checkpoint on a parallel file (BLEU, chrF) or a text (perplexity)"
    ev = sub.add_parser("eval", help=what, description=what[0].upper() + what[1:] + ".")
    _checkpoint_args(ev)
    ev.add_argument("--data", required=True, help="TSV/JSONL pairs for translation, plain text for an LM")
    ev.add_argument("--limit", type=positive_int, help="use at most this many pairs / windows (default: all)")
    ev.add_argument("--beam", type=positive_int, default=1, help="beam size for translation; 1 is greedy")
    ev.set_defaults(run=_eval)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    what = "convert between a transformers checkpoint and a moeformer one"
    conv = sub.add_parser("convert", help=what, description=what[0].upper() + what[1:] + ". OUT is built aside "
                          "and appears only when complete; --force replaces only a directory this tool or "
                          "transformers wrote.")  # fmt: skip
    conv.add_argument("source", help="a transformers directory (config.json + safetensors) or a moeformer checkpoint")
    conv.add_argument("out", help="the directory to write")
    conv.add_argument(
        "--to", choices=["hf", "moeformer"], help="direction (default: moeformer if SOURCE has config.json, else hf)"
    )
    conv.add_argument("--which", choices=["best", "latest"], default="best", help="which checkpoint of a run directory")
    conv.add_argument("--force", action="store_true", help="replace OUT if it is a model directory")
    _tokenizer_arg(conv)
    conv.set_defaults(run=_convert)


def _add_small_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="download public corpora (needs a network)")
    data.add_argument("action", choices=["download", "list"], help="download one corpus, or list their names")
    data.add_argument("name", nargs="?", help="corpus name, for download (see `moeformer data list`)")
    data.add_argument("--dest", default="data", help="folder to download into")
    data.add_argument("--quiet", action="store_true", help="no progress bar")
    data.set_defaults(run=_data)

    info = sub.add_parser("info", help="build the model of a TOML config and print its layers and size")
    info.add_argument("config", help="a TOML config file")
    info.set_defaults(run=_info)
    presets = sub.add_parser("presets", help="list the named model sizes")
    presets.set_defaults(run=_presets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeformer", description=DESCRIPTION, formatter_class=LayoutFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_train_commands(sub)
    _add_translate(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_small_commands(sub)
    _add_convert(sub)
    add_refusal_commands(sub)
    add_inspect_commands(sub)
    return parser


_OPTION = re.compile(r"^--?[A-Za-z]")  # "-x", "--xyz": an option; "-", "-5 °C" are texts


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Arguments, with ``translate``'s texts taken before and after its options.

    argparse fills a ``nargs="*"`` positional at its first chance, so in ``translate RUN --beam 4
    "text"`` the texts after the option are left over; they are appended here, in order. (Not
    ``parse_intermixed_args``: it does not support subcommands.)
    """
    args, extras = parser.parse_known_args(argv)
    if args.command == "translate":
        texts = [e for e in extras if not _OPTION.match(e)]
        extras = [e for e in extras if _OPTION.match(e)]
        args.text = [*args.text, *texts]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command == "data" and args.action == "download" and not args.name:
        parser.error("data download needs a corpus NAME (see `moeformer data list`)")
    if args.command == "translate" and args.text == ["-"]:
        args.text = []
    return args


def _os_message(err: OSError) -> str:
    """One line for an operating-system error (a full disk, a permission), or our own message."""
    if err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split())


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not fail on the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured by a test)
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    # The command line decides for its user: freed memory is kept for reuse on CPU (an MoE step
    # frees and maps tens of MB at a time; see moeformer.runtime). Importing the library does not.
    keep_freed_memory()
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"moeformer: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, CheckpointError, TrainingDiverged, DownloadError) as err:
        print(f"moeformer: error: {err}", file=sys.stderr)
        return 1
    except SafetensorError as err:  # safetensors reports a full disk as its own error, not OSError
        print(f"moeformer: error: a safetensors file could not be written or read: {' '.join(str(err).split())}",
              file=sys.stderr)  # fmt: skip
        return 1
    except BrokenPipeError:  # the reader went away (`moeformer presets | head -2`): stop quietly
        _silence_stdout()
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as err:  # a full disk, a permission, an existing output (OutputExistsError), a missing file
        print(f"moeformer: error: {_os_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moeformer: interrupted", file=sys.stderr)
        return 130
