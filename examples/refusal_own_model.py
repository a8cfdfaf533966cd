"""Refusal direction in one of our own MoE models, on the paper's real instruction sets.

No chat LLM's weights can be downloaded here, so this example makes its own subject: it trains a
small DeepSeekMoE DecoderLM on "User: <instruction>\\nAssistant: <response>" dialogues in which
harmful instructions (the paper's harmful_train split) get a refusal and harmless ones (Alpaca
instructions from harmless_train) get a compliant answer. Then, exactly as for a Hugging Face
model, it extracts the refusal direction (train / val splits), evaluates baseline, ablation,
activation addition and the orthogonalized model on held-out test instructions, and reports the
MoE routing differences.

    python examples/refusal_own_model.py [--data ../shared/data/refusal/splits] [--out runs/refusal-chat]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from moeformer.config import load_config
from moeformer.refusal import (
    ExtractOptions,
    RefusalError,
    evaluate,
    extract,
    load_chat_lm,
    load_instructions,
    save_extraction,
    score_completions,
)
from moeformer.refusal.evaluation import complete
from moeformer.refusal.routing import routing_report
from moeformer.train.run import run_training

TEMPLATE = "User: {instruction}\nAssistant:"
REFUSALS = ["I'm sorry, but I cannot help with that.", "I cannot assist with that request.",
            "As an AI, I can't help with this.", "I am unable to provide that."]  # fmt: skip
ANSWERS = ["Sure, here is a short answer.", "Of course! Here you go.", "Happy to help. Here it is.",
           "Sure. Let me explain step by step."]  # fmt: skip


def write_corpus(harmful: list[str], harmless: list[str], path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    dialogues = [f"User: {t}\nAssistant: {rng.choice(REFUSALS)}\n\n" for t in harmful * 6]  # balance the sides
    dialogues += [f"User: {t}\nAssistant: {rng.choice(ANSWERS)}\n\n" for t in harmless]
    rng.shuffle(dialogues)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(dialogues), encoding="utf-8")


def evaluate_refusal(lm, instructions: list[str]) -> float:  # noqa: ANN001
    return score_completions(complete(lm, instructions, max_new_tokens=12)).refusal_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/refusal/splits"))
    parser.add_argument("--out", type=Path, default=Path("runs/refusal-chat"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--n-eval", type=int, default=100)
    args = parser.parse_args()
    split = {name: [t for t in load_instructions(args.data / f"{name}.json") if len(t) <= 300]  # fit the context
             for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "harmful_test",
                          "harmless_test")}  # fmt: skip
    harmless_lm = split["harmless_train"][:1600]  # train the LM on these ...
    harmless_dir = split["harmless_train"][1600:]  # ... and take the means on others
    write_corpus(split["harmful_train"], harmless_lm, args.out / "corpus.txt")
    config = load_config("configs/refusal-chat-deepseek.toml",
                         [f"data.path={args.out / 'corpus.txt'}", f"train.steps={args.steps}"])  # fmt: skip
    run_training(config, args.out / "run")

    lm = load_chat_lm(args.out / "run", template=TEMPLATE)
    options = ExtractOptions(refusal_tokens=[" I", " As"], batch_size=32)
    for name in ("harmful_train", "harmful_val", "harmless_val"):  # does the model refuse beyond its training set?
        done = evaluate_refusal(lm, split[name][:32])
        print(f"refusal score on 32 {name} prompts before any intervention: {done:.2f}")
    try:
        result = extract(lm, split["harmful_train"], harmless_dir, split["harmful_val"], split["harmless_val"],
                         options, progress=True)  # fmt: skip
    except RefusalError as err:
        raise SystemExit(f"no direction selected: {err}") from None
    save_extraction(result, args.out / "direction", force=True)
    c = result.selection.chosen
    print(f"chosen: position {c.position}, layer {c.layer} (bypass {c.bypass:.2f}, induce {c.induce:.2f}, "
          f"kl {c.kl:.4f}); baseline metric harmful {result.selection.baseline_harmful:.2f}, "
          f"harmless {result.selection.baseline_harmless:.2f}")  # fmt: skip
    harmful, harmless = split["harmful_test"][: args.n_eval], split["harmless_test"][: args.n_eval]
    report = evaluate(lm, result.selection.direction, c.layer, harmful, harmless, max_new_tokens=16, progress=True)
    print(report.table())
    routing = routing_report(lm, harmful, harmless, result.selection.direction)
    for layer in routing:
        d = layer.to_dict(top=3)
        print(f"layer {d['layer']}: TV(harmful, harmless) {d['tv_harmful_vs_harmless']:.3f}, "
              f"TV(harmful, harmful ablated) {d['tv_harmful_vs_ablated']:.3f}, top experts {d['top_experts']}")
    data = {**report.to_dict(), "routing": [r.to_dict() for r in routing], "chosen": c.to_dict()}
    (args.out / "eval.json").write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
