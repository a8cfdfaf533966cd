"""From a run's config to what the trainer consumes: read, clean, split, tokenise, batch.

The training data pipeline, beside the trainer whose ``TrainingTask`` and ``Batch`` it builds;
the parts it puts together (readers, cleaning, splits, tokenizers, batching) live in
:mod:`moeformer.data`.

Translation (``corpus`` synthetic / tatoeba / tsv / jsonl): pairs are cleaned, split by the hash
of their source sentence, tokenised (source + EOS; BOS + target + EOS) and grouped into
token-budget batches, reshuffled each epoch by ``seed + epoch``. Language modelling (``text``):
the corpus is tokenised once and cut into contiguous train / valid / test regions; each epoch
draws ``seq_len + 1``-token windows at offsets shuffled by ``seed + epoch``.

Before any tokenizer is trained, the corpus file is checked (:mod:`moeformer.data.filecheck`:
missing, empty, binary, UTF-16) and read, and the run stops if more than
``data.max_rejected_fraction`` of its lines are defective (:mod:`moeformer.data.report`).
``PreparedData.report`` holds what was read and rejected; :func:`format_data_report` prints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeformer.data.batching import pad_batch, token_batches
from moeformer.data.chinese import convert_pairs
from moeformer.data.cleaning import CleaningConfig, clean_pairs
from moeformer.data.config import DataConfig
from moeformer.data.filecheck import CorpusError, check_text_file
from moeformer.data.readers import document_paths, read_documents, read_parallel
from moeformer.data.report import check_rejected, format_data_report, read_summary
from moeformer.data.splits import split_pairs, spread_subset
from moeformer.data.synthetic import generate_pairs
from moeformer.data.tokenizer import TokenizerPair, train_tokenizer, train_tokenizer_pair
from moeformer.evaluate.translation import evaluate_translation
from moeformer.model_config import ModelConfig, config_to_dict
from moeformer.train.run_config import Config
from moeformer.train.trainer import Batch, TrainingTask

Pair = tuple[str, str]

__all__ = ["PreparedData", "format_data_report", "prepare", "read_pairs"]


@dataclass
class PreparedData:
    task: TrainingTask
    model_config: ModelConfig  # the configured model with the tokenizers' vocabulary sizes
    tokenizers: TokenizerPair  # for a language model, source and target are the same tokenizer
    test_pairs: list[Pair] = field(default_factory=list)  # translation only
    # what was read and rejected (moeformer.data.report.read_summary's keys), "filtered" by
    # cleaning, and split sizes; print it with format_data_report
    report: dict[str, Any] = field(default_factory=dict)


def read_pairs(config: Config) -> tuple[list[Pair], dict[str, Any]]:
    """The corpus's pairs after reading and cleaning, and the report of what was dropped and why.

    The report holds :func:`~moeformer.data.report.read_summary`'s keys (empty for the
    synthetic corpus), ``filtered`` ({reason: count} of cleaning's filters) and ``pairs``.
    """
    data = config.data
    if data.corpus == "synthetic":
        pairs, report = generate_pairs(data.synthetic_pairs, seed=data.seed), {}
    else:
        check_corpus_path(data)
        fmt = "jsonl" if data.corpus == "jsonl" else "tsv"
        pairs, read_report = read_parallel(data.path, format=fmt)
        report = read_summary(read_report)
    pairs, clean_report = clean_pairs(pairs, CleaningConfig(max_chars=data.max_chars, chinese=data.chinese_sides))
    return pairs, {**report, "filtered": dict(clean_report.rejected), "pairs": len(pairs)}


def check_corpus_path(data: DataConfig) -> None:
    """Raise :class:`CorpusError` naming ``data.path`` (as resolved) if it is missing or not text.

    A directory (corpus "text") must hold ``*.txt`` files; its empty ones are left to the reader,
    which skips and counts them.
    """
    path = Path(data.path)  # type: ignore[arg-type]
    if not path.exists():
        raise CorpusError(
            f"data.path: no such file or directory: {path.absolute()} (a relative path in a config file is read from "
            "the config file's directory; one given with --set, from the current directory)"
        )
    if not path.is_dir():
        check_text_file(path)
        return
    if data.is_translation:
        raise CorpusError(f"data.path: {path} is a directory; corpus {data.corpus!r} reads one file")
    files = document_paths(path)
    if not files:
        raise CorpusError(f"data.path: the directory {path} holds no *.txt files")
    for file in files:
        if file.stat().st_size:
            check_text_file(file)


def prepare(config: Config, tokenizers: TokenizerPair | None = None) -> PreparedData:
    """Everything a training run needs; pass the checkpoint's ``tokenizers`` when resuming."""
    if config.data.is_translation != (config.model.arch == "seq2seq"):
        raise ValueError(
            f"data.corpus {config.data.corpus!r} does not fit model.arch {config.model.arch!r}: translation "
            "corpora need arch 'seq2seq', corpus 'text' needs arch 'decoder'"
        )
    if config.data.is_translation:
        return _prepare_translation(config, tokenizers)
    return _prepare_lm(config, tokenizers)


def _prepare_translation(config: Config, tokenizers: TokenizerPair | None) -> PreparedData:
    data, train_cfg = config.data, config.train
    pairs, report = read_pairs(config)
    if report.get("files"):
        check_rejected(report, data.max_rejected_fraction)
    _check_enough_pairs(data, report)
    splits = split_pairs(pairs, valid=data.valid_size, test=data.test_size, seed=data.seed)
    # one script (data.zh_script) for training and validation, where a traditional and a
    # simplified translation of one sentence become one pair; the test references stay as given:
    # evaluation scores against them and against their converted form
    train_pairs = list(dict.fromkeys(convert_pairs(splits.train, data.zh_script, data.chinese_sides)))
    converted_valid = list(dict.fromkeys(convert_pairs(splits.valid, data.zh_script, data.chinese_sides)))
    test_pairs = _convert_sources(splits.test, data)
    if tokenizers is None:
        tokenizers = train_tokenizer_pair(
            train_pairs, kind=data.tokenizer, vocab_size=data.vocab_size, shared=data.shared_vocab
        )
    model_config = _with_vocab(config.model, tokenizers)
    limit = model_config.max_seq_len
    _, train = _encode_pairs(tokenizers, train_pairs, limit)
    valid_pairs, valid = _encode_pairs(tokenizers, converted_valid, limit)
    report.update(
        train=len(train),
        valid=len(valid),
        test=len(test_pairs),
        too_long=len(train_pairs) + len(converted_valid) - len(train) - len(valid),
    )
    merged = len(splits.train) + len(splits.valid) - len(train_pairs) - len(converted_valid)
    if merged:  # pairs that differed only in script
        report["merged_by_script"] = merged
    pad = tokenizers.target.pad_id

    def batches(encoded: Sequence[tuple[list[int], list[int]]], seed: int, shuffle: bool) -> list[Batch]:
        groups = token_batches(
            [len(s) for s, _ in encoded],
            train_cfg.batch_tokens,
            target_lengths=[len(t) for _, t in encoded],
            seed=seed,
            shuffle=shuffle,
        )
        return [_translation_batch([encoded[i] for i in g], pad) for g in groups]

    valid_batches = batches(valid, data.seed, shuffle=False)
    task = TrainingTask(
        train_batches=lambda epoch: batches(train, data.seed + epoch, shuffle=True),
        valid_batches=valid_batches,
        # spread over the pairs the validation loss sees: a length-sorted corpus (Tatoeba) would
        # otherwise give the shortest sentences only
        evaluate=_bleu_evaluator(
            tokenizers, spread_subset(valid_pairs, train_cfg.bleu_samples, seed=data.seed), data.target_lang
        ),
        meta=_meta(config, model_config, tokenizers),
        pad_id=pad,
    )
    return PreparedData(task, model_config, tokenizers, test_pairs, report)


def _convert_sources(pairs: list[Pair], data: DataConfig) -> list[Pair]:
    """Test pairs with a Chinese source in ``data.zh_script``; the references are kept as given."""
    if data.chinese_sides not in ("source", "both"):
        return pairs
    return [(s, t) for (s, _), (_, t) in zip(convert_pairs(pairs, data.zh_script, "source"), pairs)]


def _check_enough_pairs(data: DataConfig, report: dict[str, Any]) -> None:
    """Name the file and the config keys when there are too few pairs for the splits asked for."""
    n, held_out = report["pairs"], data.valid_size + data.test_size
    if n > held_out:
        return
    source = report["files"][0] if report.get("files") else "the synthetic corpus"
    read = f" of {report['lines']:,} lines ({report['read']:,} read as pairs)" if report.get("files") else ""
    raise CorpusError(
        f"{source}: {n:,} usable pairs{read} after cleaning, but data.valid_size ({data.valid_size}) + "
        f"data.test_size ({data.test_size}) = {held_out} are held out and training needs at least one more"
    )


def _encode_pairs(
    tok: TokenizerPair, pairs: Sequence[Pair], limit: int
) -> tuple[list[Pair], list[tuple[list[int], list[int]]]]:
    """The pairs that fit ``limit`` tokens on each side, and their token ids (source + EOS, BOS + target + EOS)."""
    kept, out = [], []
    for src, tgt in pairs:
        s, t = tok.source.encode(src, eos=True), tok.target.encode(tgt, bos=True, eos=True)
        if len(s) <= limit and len(t) - 1 <= limit:  # the decoder sees len(t) - 1 positions
            kept.append((src, tgt))
            out.append((s, t))
    return kept, out


def _translation_batch(examples: Sequence[tuple[list[int], list[int]]], pad: int) -> Batch:
    src, src_pad = pad_batch([s for s, _ in examples], pad)
    tgt, tgt_pad = pad_batch([t for _, t in examples], pad)
    inputs = {"src": src, "tgt": tgt[:, :-1], "src_padding_mask": src_pad, "tgt_padding_mask": tgt_pad[:, :-1]}
    target = tgt[:, 1:]
    return Batch(inputs, target, n_tokens=int((target != pad).sum()))


def _bleu_evaluator(tok: TokenizerPair, pairs: Sequence[Pair], target_lang: str) -> Callable | None:
    """BLEU / chrF on validation ``pairs`` during training. Their references are already in
    ``data.zh_script`` (validation follows the training data), so one variant is scored here; the
    final test scores both the given and the converted references (``translation_scores``)."""
    if not pairs:
        return None

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return evaluate_translation(model, tok, pairs, target_lang=target_lang).as_dict()

    return evaluate


def _prepare_lm(config: Config, tokenizers: TokenizerPair | None) -> PreparedData:
    data, train_cfg = config.data, config.train
    check_corpus_path(data)
    texts, read_report = read_documents(data.path)  # type: ignore[arg-type]
    summary = read_summary(read_report)
    check_rejected(summary, data.max_rejected_fraction)
    if not texts:
        raise CorpusError(f"data.path: {data.path}: no text read (every file empty or blank)")
    text = "\n".join(texts)
    if tokenizers is None:
        one = train_tokenizer([text], kind=data.tokenizer, vocab_size=data.vocab_size)
        tokenizers = TokenizerPair(one, one)
    model_config = _with_vocab(config.model, tokenizers)
    seq = min(data.seq_len, model_config.max_seq_len)
    ids = torch.tensor(tokenizers.source.encode(text), dtype=torch.long)
    n_valid, n_test = data.valid_size * (seq + 1), data.test_size * (seq + 1)
    if len(ids) < n_valid + n_test + 2 * (seq + 1):
        raise CorpusError(
            f"{data.path}: {len(ids):,} tokens are too few for data.valid_size={data.valid_size} and "
            f"data.test_size={data.test_size} windows of {seq + 1} tokens plus two windows of training data"
        )
    train_ids = ids[: len(ids) - n_valid - n_test]
    valid_ids = ids[len(train_ids) : len(train_ids) + n_valid]
    per_batch = max(1, train_cfg.batch_tokens // seq)

    def windows(source: torch.Tensor, offsets: torch.Tensor) -> list[Batch]:
        out = []
        for group in offsets.split(per_batch):
            chunk = torch.stack([source[o : o + seq + 1] for o in group.tolist()])
            out.append(Batch({"tokens": chunk[:, :-1]}, chunk[:, 1:], n_tokens=chunk[:, 1:].numel()))
        return out

    def train_batches(epoch: int) -> list[Batch]:
        g = torch.Generator().manual_seed(data.seed + epoch)
        n_windows = max(1, (len(train_ids) - seq - 1) // seq)
        return windows(train_ids, torch.randint(0, len(train_ids) - seq - 1, (n_windows,), generator=g))

    valid_batches = windows(valid_ids, torch.arange(0, len(valid_ids) - seq, seq + 1))
    report = {
        **summary,
        "documents": len(texts),
        "tokens": len(ids),
        "train_tokens": len(train_ids),
        "valid_windows": data.valid_size,
        "test_windows": data.test_size,
    }
    task = TrainingTask(
        train_batches, valid_batches, None, _meta(config, model_config, tokenizers), pad_id=tokenizers.source.pad_id
    )
    return PreparedData(task, model_config, tokenizers, [], report)


def _with_vocab(model: ModelConfig, tok: TokenizerPair) -> ModelConfig:
    src_vocab = None if tok.shared or model.arch == "decoder" else tok.source.vocab_size
    return dataclasses.replace(
        model, vocab_size=tok.target.vocab_size, src_vocab_size=src_vocab, pad_id=tok.target.pad_id
    )


def _meta(config: Config, model_config: ModelConfig, tok: TokenizerPair) -> dict[str, Any]:
    return {
        "config": {
            "model": config_to_dict(model_config),
            "data": config_to_dict(config.data),
            "train": config_to_dict(config.train),
        },
        "tokenizer": tok.to_dict(),
    }
