"""Abliteration edits compared on a model that refuses (issue 16 on issue 15's subject).

For a subject of ``examples/refusal_subject.py`` and its extracted direction, each weight edit is
applied to a copy of the model: ``orthogonal`` (the paper's), ``projected`` (only r's part
orthogonal to the harmless mean), ``norm-preserving``, and the per-layer strength kernel chosen by
``refusal tune`` (Optuna TPE under a KL budget, on the validation splits). Each edited model is
scored on what users weigh against each other: JailbreakBench refusal (greedy completions, the
paper's substring score; lower = the edit worked), harmless_test refusal, KL(base || edited) of
the next-token distribution after harmless prompts, and cross-entropy on plain held-out text
(wikitext-2 test paragraphs). Writes OUT/methods.{json,md} and OUT/pareto.png (refusal vs KL).

    python examples/abliteration_methods.py [--subject runs/refusal-subject/deepseek-seed0]
        [--out runs/abliteration-methods] [--trials 40] [--n-harmless 200]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from refusal_subject import fitting_prompts, plain_text, subject_refusal_tokens, wikitext_sentences  # noqa: E402

from moeformer.publish import write_bytes, write_text  # noqa: E402
from moeformer.refusal import load_chat_lm  # noqa: E402
from moeformer.refusal.edits import StrengthKernel  # noqa: E402
from moeformer.refusal.evaluation import complete, text_loss  # noqa: E402
from moeformer.refusal.extract import load_direction, load_harmless_mean  # noqa: E402
from moeformer.refusal.openers import RefusalOpeners  # noqa: E402
from moeformer.refusal.orthogonalize import orthogonalize_weights  # noqa: E402
from moeformer.refusal.scoring import score_completions  # noqa: E402
from moeformer.refusal.selection import kl_divergence, last_logits  # noqa: E402
from moeformer.refusal.subject_data import build_subject_data  # noqa: E402
from moeformer.refusal.tune import TuneOptions, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "User: {instruction}\nAssistant:"


def measure(lm, base, prompts: dict[str, list[str]], texts: list[str], new: int) -> dict[str, float]:  # noqa: ANN001
    sides = (("jailbreakbench", prompts["harmful"]), ("harmless", prompts["harmless"]))
    refused = {side: score_completions(complete(lm, items, max_new_tokens=new)).refusal_score for side, items in sides}
    with torch.no_grad():
        kl = float(kl_divergence(base, last_logits(lm, prompts["harmless"])).mean())
        ce = text_loss(lm, texts)
    return {"jailbreakbench_refusal": refused["jailbreakbench"], "harmless_refusal": refused["harmless"],
            "kl_harmless": kl, "plain_text_ce": ce}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subject", type=Path, default=ROOT / "runs" / "refusal-subject" / "deepseek-seed0")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "abliteration-methods")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--n-harmless", type=int, default=200)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0,
                        help="the subject's seed (draws the responses its refusal tokens come from)")
    args = parser.parse_args()
    direction_dir = args.subject / "direction"
    direction, layer = load_direction(direction_dir)
    lm = load_chat_lm(args.subject, template=TEMPLATE)
    subject = build_subject_data(args.data / "refusal")
    limit = lm.model.config.max_seq_len - args.new
    prompts = {"harmful": fitting_prompts(lm, subject.harmful_eval, limit),
               "harmless": fitting_prompts(lm, subject.harmless_eval, limit)[: args.n_harmless]}  # fmt: skip
    texts = plain_text(args.data, lm)
    with torch.no_grad():
        base_logits = last_logits(lm, prompts["harmless"])
    # the tokens that begin the subject's refusals and not its answers, as its extraction used them
    # (until 2026-12-07 the first words of the refusal openers, several of which begin answers too)
    tokens = subject_refusal_tokens(lm, wikitext_sentences(args.data), args.seed)
    val = fitting_prompts(lm, subject.harmful_val, limit), fitting_prompts(lm, subject.harmless_val, limit)[:64]
    tuned = tune(lm, direction_dir, *val,
                 RefusalOpeners.from_texts(lm, tokens), args.out / "tune", TuneOptions(trials=args.trials),
                 progress=True)  # fmt: skip
    edits: dict[str, dict] = {"orthogonal": {}, "projected": {"harmless_mean": load_harmless_mean(direction_dir)},
                              "norm-preserving": {}}  # fmt: skip
    if tuned.best is not None:
        kernel = StrengthKernel(**{k: tuned.best["params"][k] for k in ("peak_layer", "width", "peak", "minimum")})
        edits["tuned kernel"] = {"kernel": kernel}
    rows = {"none (baseline)": measure(lm, base_logits, prompts, texts, args.new)}
    for name, options in edits.items():
        method = "orthogonal" if name == "tuned kernel" else name
        edited = copy.deepcopy(lm)
        orthogonalize_weights(edited, direction, method=method, **options)
        rows[name] = measure(edited, base_logits, prompts, texts, args.new)
        print(name, rows[name])
    md = [f"Subject: {args.subject}; direction layer {layer}; {len(prompts['harmful'])} JailbreakBench and "
          f"{len(prompts['harmless'])} harmless_test prompts; {len(texts)} wikitext-2 test paragraphs.", "",
          "| edit | JailbreakBench refusal | harmless refusal | KL (harmless) | plain-text CE |",
          "|---|---|---|---|---|"]  # fmt: skip
    md += [f"| {n} | {r['jailbreakbench_refusal']:.2f} | {r['harmless_refusal']:.2f} | {r['kl_harmless']:.4f} "
           f"| {r['plain_text_ce']:.4f} |" for n, r in rows.items()]  # fmt: skip
    if tuned.best is not None:
        md += ["", f"Refusal tokens of the tuning metric: {tokens}.", ""]
        md += [f"Tuned kernel ({args.trials} trials, KL budget 0.1 on validation prompts): {tuned.best['params']}."]
    write_text(args.out / "methods.json", json.dumps({"rows": rows, "tuned": tuned.best}, indent=1, default=str))
    write_text(args.out / "methods.md", "\n".join(md) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, r in rows.items():
        ax.scatter(r["kl_harmless"], r["jailbreakbench_refusal"], s=60)
        ax.annotate(name, (r["kl_harmless"], r["jailbreakbench_refusal"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.set(xlabel="KL(base || edited), harmless prompts", ylabel="JailbreakBench refusal score",
           title="Abliteration edits: refusal left vs damage")  # fmt: skip
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(args.out / "pareto.png", buffer.getvalue())
    print("\n".join(md))


if __name__ == "__main__":
    main()
