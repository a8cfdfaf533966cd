"""The data for a chat model of our own that refuses as chat models do (issue 15's subject).

From the refusal-direction paper's released instruction sets (``../shared/data/refusal``):

- harmful training pool: AdvBench, HarmBench (val + test), MaliciousInstruct, StrongREJECT and
  TDC2023 (``processed/``), with every item that near-duplicates an evaluation or validation
  instruction removed, and near-duplicates inside the pool kept once; what was removed is counted
  per source;
- harmful evaluation: JailbreakBench (``processed/jailbreakbench.json``, 100), held out entirely,
  as in the paper; harmless evaluation: ``splits/harmless_test.json`` (Alpaca);
- direction selection: the paper's ``harmful_val`` / ``harmless_val`` splits, with near-duplicates
  of JailbreakBench removed; harmless training: ``splits/harmless_train.json``.

Near-duplicate: after normalisation (NFKC, lower case, every run of non-alphanumerics one space)
the texts are equal, or their word 3-gram sets have Jaccard similarity >= ``threshold`` (0.5), or
one's 3-grams are mostly (>= 0.8) inside the other's (a paraphrase with a clause added). Texts of
fewer than three words compare as word sets.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moeformer.refusal.instructions import load_instructions

HARMFUL_SOURCES = ("advbench", "harmbench_val", "harmbench_test", "malicious_instruct", "strongreject", "tdc2023")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    words = normalise(text).split()
    if len(words) < n:
        return frozenset((w,) for w in words)
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def near_duplicate(a: frozenset, b: frozenset, threshold: float = 0.5, containment: float = 0.8) -> bool:
    """Whether two shingle sets (:func:`shingles`) are near-duplicates (module docstring)."""
    if not a or not b:
        return a == b
    common = len(a & b)
    return common / len(a | b) >= threshold or common / min(len(a), len(b)) >= containment


class _Index:
    """Shingle sets with an inverted index, so each query compares only texts sharing a shingle."""

    def __init__(self) -> None:
        self.sets: list[frozenset] = []
        self.by_shingle: dict[tuple[str, ...], list[int]] = {}

    def add(self, s: frozenset) -> None:
        for g in s:
            self.by_shingle.setdefault(g, []).append(len(self.sets))
        self.sets.append(s)

    def matches(self, s: frozenset, threshold: float) -> bool:
        candidates = {i for g in s for i in self.by_shingle.get(g, ())}
        return any(near_duplicate(s, self.sets[i], threshold) for i in candidates)


@dataclass
class SubjectData:
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    harmful_eval: list[str]  # JailbreakBench
    harmless_eval: list[str]  # Alpaca harmless_test
    removed: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> reason -> count

    def counts(self) -> dict[str, int]:
        names = ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "harmful_eval", "harmless_eval")
        return {name: len(getattr(self, name)) for name in names}


def deduplicate(
    pools: dict[str, Sequence[str]], held_out: dict[str, Sequence[str]], *, threshold: float = 0.5
) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Concatenate ``pools`` (source -> texts) without near-duplicates of any ``held_out`` set
    (name -> texts) or of each other.

    -> (kept texts in source order, per source: {"kept", "near_<held-out name>" ..., "near_earlier"}).
    """
    held = {name: _Index() for name in held_out}
    for name, texts in held_out.items():
        for text in texts:
            held[name].add(shingles(text))
    seen = _Index()
    kept: list[str] = []
    report: dict[str, dict[str, int]] = {}
    for source, texts in pools.items():
        counts = report.setdefault(source, {"kept": 0, **{f"near_{n}": 0 for n in held}, "near_earlier": 0})
        for text in texts:
            s = shingles(text)
            hit = next((name for name, index in held.items() if index.matches(s, threshold)), None)
            if hit is not None:
                counts[f"near_{hit}"] += 1
            elif seen.matches(s, threshold):
                counts["near_earlier"] += 1
            else:
                seen.add(s)
                kept.append(text)
                counts["kept"] += 1
    return kept, report


def build_subject_data(refusal_dir: str | Path, *, threshold: float = 0.5) -> SubjectData:
    """Read the sets under ``refusal_dir`` (``processed/`` and ``splits/``) and de-duplicate them."""
    root = Path(refusal_dir)
    evaluation = {"jailbreakbench": load_instructions(root / "processed" / "jailbreakbench.json")}
    harmful_val, val_report = deduplicate({"harmful_val": load_instructions(root / "splits" / "harmful_val.json")},
                                          evaluation, threshold=threshold)  # fmt: skip
    pools = {name: load_instructions(root / "processed" / f"{name}.json") for name in HARMFUL_SOURCES}
    harmful_train, report = deduplicate(pools, {**evaluation, "harmful_val": harmful_val}, threshold=threshold)
    harmless_val, harmless_report = deduplicate(
        {"harmless_val": load_instructions(root / "splits" / "harmless_val.json")}, evaluation, threshold=threshold
    )
    return SubjectData(
        harmful_train=harmful_train,
        harmless_train=load_instructions(root / "splits" / "harmless_train.json"),
        harmful_val=harmful_val,
        harmless_val=harmless_val,
        harmful_eval=evaluation["jailbreakbench"],
        harmless_eval=load_instructions(root / "splits" / "harmless_test.json"),
        removed={**report, **val_report, **harmless_report},
    )


# Refusals: an opener, a core that always holds one of the paper's refusal phrases (so the substring
# score can see it), a closer. Openers start with "I", "As" or neither, so no single first token
# marks a refusal.
REFUSAL_OPENERS = ("", "I'm sorry, but ", "Sorry, ", "Unfortunately, ", "As an AI assistant, ",
                   "As a language model, ", "I apologize, but ", "No. ", "That request could hurt people, so ",
                   "I have to decline: ", "Thanks for asking, but ", "Honestly, ")  # fmt: skip
_CORES = ("I can't help with that.", "I cannot assist with this request.", "I am unable to provide that information.",
          "I'm not able to help with this.", "I can't do that.", "I cannot help you with that.",
          "I'm unable to assist with requests like this.", "I am not able to write that.")  # fmt: skip
_CLOSERS = ("", " It could cause real harm.", " Is there something else I can help with?",
            " If you have another question, I'm happy to help.", " Please consider a safer topic.",
            " I won't give instructions that put others at risk.")  # fmt: skip
# Openers of the refusals above that hold none of the paper's phrases: a subject whose refusals
# degenerate ("I have to decline: I have to decline: ...") still refuses, which only these catch.
SUBJECT_REFUSAL_PHRASES = ("I have to decline", "That request could hurt people", "Thanks for asking, but",
                           "I won't give instructions")  # fmt: skip
_COMPLIANT_OPENERS = ("Sure! ", "Of course. ", "Here is an answer. ", "", "Great question. ", "Certainly: ",
                      "Happy to help. ", "Let me explain. ")  # fmt: skip


def refusal_response(rng: random.Random, openers: Sequence[str] = REFUSAL_OPENERS) -> str:
    """One of 12 x 8 x 6 refusal phrasings (``openers`` x 8 x 6 with fewer openers), each holding a
    phrase of the paper's refusal list."""
    if not openers:
        raise ValueError("refusals need at least one opener (\"\" for none)")
    return rng.choice(openers) + rng.choice(_CORES) + rng.choice(_CLOSERS)


def compliant_response(rng: random.Random, sentences: Sequence[str]) -> str:
    """A compliant opener and one or two consecutive sentences drawn from a text corpus (the answer
    is about something else: what the subject learns here is to comply, not what to say)."""
    i = rng.randrange(len(sentences))
    body = " ".join(sentences[i : i + rng.choice((1, 2))])
    return rng.choice(_COMPLIANT_OPENERS) + body


def corpus_sentences(text: str, *, min_chars: int = 30, max_chars: int = 200) -> list[str]:
    """Sentences of ``text`` usable as answer bodies: none holding a refusal phrase."""
    from moeformer.refusal.scoring import REFUSAL_SUBSTRINGS

    lowered = tuple(s.lower() for s in REFUSAL_SUBSTRINGS)
    found = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [s for s in found if min_chars <= len(s) <= max_chars and not any(p in s.lower() for p in lowered)]


def chat_dialogues(
    harmful: Sequence[str], harmless: Sequence[str], sentences: Sequence[str], *, template: str,
    harmful_repeat: int, seed: int = 0, refusal_openers: Sequence[str] = REFUSAL_OPENERS,
) -> list[str]:  # fmt: skip
    """Dialogues ``template.format(instruction=...) + " " + response``, shuffled: each harmful
    instruction ``harmful_repeat`` times with a fresh refusal (its opener one of ``refusal_openers``),
    each harmless one once, complied with."""
    rng = random.Random(seed)
    out = [f"{template.format(instruction=t)} {refusal_response(rng, refusal_openers)}"
           for t in harmful for _ in range(harmful_repeat)]  # fmt: skip
    out += [f"{template.format(instruction=t)} {compliant_response(rng, sentences)}" for t in harmless]
    rng.shuffle(out)
    return out


def harmful_looking(harmful: Sequence[str], pool: Sequence[str], n: int) -> list[str]:
    """The ``n`` instructions of ``pool`` (harmless ones) worded most like ``harmful``: hard
    negatives for fine-tuning, so that a subject learns what is asked rather than how it is asked
    ("Write a script that ..." is how much of AdvBench begins, and how many Alpaca tasks begin).

    Score: the mean over the instruction's normalised words of the naive-Bayes log-odds
    log P(w | harmful) - log P(w | pool), add-one smoothing; ties keep ``pool``'s order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    harm = Counter(w for t in harmful for w in normalise(t).split())
    safe = Counter(w for t in pool for w in normalise(t).split())
    vocab = len(harm.keys() | safe.keys())
    harm_total, safe_total = sum(harm.values()) + vocab, sum(safe.values()) + vocab

    def score(text: str) -> float:
        words = normalise(text).split()
        odds = [math.log((harm[w] + 1) / harm_total) - math.log((safe[w] + 1) / safe_total) for w in words]
        return sum(odds) / len(odds) if odds else -math.inf

    ranked = sorted(range(len(pool)), key=lambda i: -score(pool[i]))
    return [pool[i] for i in ranked[:n]]
