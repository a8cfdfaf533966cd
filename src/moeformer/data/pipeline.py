"""From a run's config to what the trainer consumes: read, clean, split, tokenise, batch.

Translation (``corpus`` synthetic / tatoeba / tsv / jsonl): pairs are cleaned, split by the hash
of their source sentence, tokenised (source + EOS; BOS + target + EOS) and grouped into
token-budget batches, reshuffled each epoch by ``seed + epoch``. Language modelling (``text``):
the corpus is tokenised once and cut into contiguous train / valid / test regions; each epoch
draws ``seq_len + 1``-token windows at offsets shuffled by ``seed + epoch``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moeformer.config import Config, ModelConfig, config_to_dict
from moeformer.data.batching import pad_batch, token_batches
from moeformer.data.cleaning import CleaningConfig, clean_pairs
from moeformer.data.readers import read_documents, read_parallel
from moeformer.data.splits import split_pairs
from moeformer.data.synthetic import generate_pairs
from moeformer.data.tokenizer import TokenizerPair, train_tokenizer, train_tokenizer_pair
from moeformer.train.trainer import Batch, TrainingTask

Pair = tuple[str, str]


@dataclass
class PreparedData:
    task: TrainingTask
    model_config: ModelConfig  # the configured model with the tokenizers' vocabulary sizes
    tokenizers: TokenizerPair  # for a language model, source and target are the same tokenizer
    test_pairs: list[Pair] = field(default_factory=list)  # translation only
    report: dict[str, Any] = field(default_factory=dict)  # counts: read, rejected by reason, split sizes


def read_pairs(config: Config) -> tuple[list[Pair], dict[str, Any]]:
    """The corpus's pairs after reading and cleaning, and the counts of what was dropped and why."""
    data = config.data
    if data.corpus == "synthetic":
        pairs, rejected = generate_pairs(data.synthetic_pairs, seed=data.seed), {}
    else:
        fmt = "jsonl" if data.corpus == "jsonl" else "tsv"
        pairs, read_report = read_parallel(data.path, format=fmt)
        rejected = dict(read_report.rejected)
    pairs, clean_report = clean_pairs(pairs, CleaningConfig(max_chars=data.max_chars))
    rejected.update(clean_report.rejected)
    return pairs, {"pairs": len(pairs), "rejected": rejected}


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
    splits = split_pairs(pairs, valid=data.valid_size, test=data.test_size, seed=data.seed)
    if tokenizers is None:
        tokenizers = train_tokenizer_pair(
            splits.train, kind=data.tokenizer, vocab_size=data.vocab_size, shared=data.shared_vocab
        )
    model_config = _with_vocab(config.model, tokenizers)
    limit = model_config.max_seq_len
    train = _encode_pairs(tokenizers, splits.train, limit)
    valid = _encode_pairs(tokenizers, splits.valid, limit)
    report.update(
        train=len(train),
        valid=len(valid),
        test=len(splits.test),
        too_long=len(splits.train) + len(splits.valid) - len(train) - len(valid),
    )
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
        evaluate=_bleu_evaluator(tokenizers, splits.valid[: train_cfg.bleu_samples], data.target_lang),
        meta=_meta(config, model_config, tokenizers),
        pad_id=pad,
    )
    return PreparedData(task, model_config, tokenizers, splits.test, report)


def _encode_pairs(tok: TokenizerPair, pairs: Sequence[Pair], limit: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for src, tgt in pairs:
        s, t = tok.source.encode(src, eos=True), tok.target.encode(tgt, bos=True, eos=True)
        if len(s) <= limit and len(t) - 1 <= limit:  # the decoder sees len(t) - 1 positions
            out.append((s, t))
    return out


def _translation_batch(examples: Sequence[tuple[list[int], list[int]]], pad: int) -> Batch:
    src, src_pad = pad_batch([s for s, _ in examples], pad)
    tgt, tgt_pad = pad_batch([t for _, t in examples], pad)
    inputs = {"src": src, "tgt": tgt[:, :-1], "src_padding_mask": src_pad, "tgt_padding_mask": tgt_pad[:, :-1]}
    target = tgt[:, 1:]
    return Batch(inputs, target, n_tokens=int((target != pad).sum()))


def _bleu_evaluator(tok: TokenizerPair, pairs: Sequence[Pair], target_lang: str) -> Callable | None:
    if not pairs:
        return None

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        from moeformer.evaluate.metrics import bleu, chrf
        from moeformer.inference import translate

        hyps = translate(model, tok, [s for s, _ in pairs], batch_size=64)
        refs = [t for _, t in pairs]
        return {"bleu": bleu(hyps, refs, target_lang=target_lang), "chrf": chrf(hyps, refs)}

    return evaluate


def _prepare_lm(config: Config, tokenizers: TokenizerPair | None) -> PreparedData:
    data, train_cfg = config.data, config.train
    texts, read_report = read_documents(data.path)
    text = "\n".join(texts)
    if tokenizers is None:
        one = train_tokenizer([text], kind=data.tokenizer, vocab_size=data.vocab_size)
        tokenizers = TokenizerPair(one, one)
    model_config = _with_vocab(config.model, tokenizers)
    seq = min(data.seq_len, model_config.max_seq_len)
    ids = torch.tensor(tokenizers.source.encode(text), dtype=torch.long)
    n_valid, n_test = data.valid_size * (seq + 1), data.test_size * (seq + 1)
    if len(ids) < n_valid + n_test + 2 * (seq + 1):
        raise ValueError(
            f"{data.path}: {len(ids)} tokens are too few for valid_size={data.valid_size} and "
            f"test_size={data.test_size} windows of {seq + 1} tokens plus training data"
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
        "documents": len(texts),
        "rejected": dict(read_report.rejected),
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
