"""Tests for the tokenizers (moeformer.data.bpe_tokenizer, moeformer.data.tokenizer): exact round trips,
special ids, saving and loading, on tricky strings and on the real corpora."""

from __future__ import annotations

import json
import time

import pytest

from moeformer.data.bpe_tokenizer import BPETokenizer
from moeformer.data.char_tokenizer import CharTokenizer
from moeformer.data.readers import read_tsv
from moeformer.data.tokenizer import (
    Tokenizer,
    TokenizerPair,
    tokenizer_from_dict,
    train_tokenizer,
    train_tokenizer_pair,
)

TRICKY = [
    "你好吗？",
    "Are you OK?",
    "  two  leading,   three inside, trailing  ",
    "tabs\tand\nnewlines\r\n",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "full-width ＡＢＣ　and ideographic space",
    "<eos> <pad> typed as text",
    "mixed 中文 and English 混合",
    "",
    " ",
]
SMALL_CORPUS = ["Hello world, hello there.", "我爱北京天安门。", "The river is too wide.", "这条河太宽了。"] * 20


@pytest.fixture(scope="module")
def small_bpe() -> BPETokenizer:
    return BPETokenizer.train(SMALL_CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def cmn_texts(shared_data) -> list[str]:
    pairs, _ = read_tsv(shared_data("cmn-eng", "cmn.txt"))
    return [text for pair in pairs for text in pair]


@pytest.fixture(scope="module")
def shakespeare_lines(shared_data) -> list[str]:
    return shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8").split("\n")[:5000]


@pytest.fixture(scope="module")
def cmn_bpe(cmn_texts) -> BPETokenizer:
    return BPETokenizer.train(cmn_texts, vocab_size=4000)


# --------------------------------------------------------------------------------------------
# BPE on its own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip_is_exact(small_bpe, text):
    """decode(encode(x)) == x for Chinese, emoji, runs of spaces, control whitespace, unseen text."""
    assert small_bpe.decode(small_bpe.encode(text)) == text


def test_bpe_special_ids(small_bpe):
    """pad 0, bos 1, eos 2, unk 3, as CharTokenizer; encode adds bos/eos only when asked."""
    assert (small_bpe.pad_id, small_bpe.bos_id, small_bpe.eos_id, small_bpe.unk_id) == (0, 1, 2, 3)
    assert [small_bpe.backend.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    ids = small_bpe.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and all(i >= 4 for i in ids[1:-1])
    assert small_bpe.encode("<eos>") != [2]  # a typed special string is ordinary text


def test_bpe_decode_stops_at_eos_and_skips_specials(small_bpe):
    """decode stops at EOS, drops pad/bos/unk and ids outside the vocabulary."""
    hello, world = small_bpe.encode("hello"), small_bpe.encode(" world")
    ids = [1] + hello + [0, 3, 10**6] + world + [2] + small_bpe.encode("ignored") + [0]
    assert small_bpe.decode(ids) == "hello world"


def test_bpe_vocab_size(small_bpe):
    """The vocabulary never exceeds the request; below specials + 256 bytes is an error."""
    assert 260 <= small_bpe.vocab_size <= 300
    with pytest.raises(ValueError, match="vocab_size must be at least 260"):
        BPETokenizer.train(SMALL_CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency must be at least 1"):
        BPETokenizer.train(SMALL_CORPUS, min_frequency=0)


def test_bpe_merges_chinese_words(cmn_bpe):
    """On cmn.txt the vocabulary reaches the request and BPE merges inside unspaced Chinese."""
    assert cmn_bpe.vocab_size == 4000
    text = "我们明天去北京。"
    assert len(cmn_bpe.encode(text)) < len(text.encode("utf-8")) / 2


def test_bpe_save_and_load(small_bpe):
    """to_dict is JSON-able; from_dict gives an equal tokenizer that encodes identically."""
    data = json.loads(json.dumps(small_bpe.to_dict()))
    loaded = BPETokenizer.from_dict(data)
    assert loaded == small_bpe and data["kind"] == "bpe"
    for text in TRICKY:
        assert loaded.encode(text) == small_bpe.encode(text)
    assert loaded.encode("<eos>") == small_bpe.encode("<eos>")  # special strings stay text after loading
    with pytest.raises(ValueError, match="not a BPE tokenizer"):
        BPETokenizer.from_dict({"kind": "char", "chars": "ab"})
    with pytest.raises(ValueError, match="needs 'tokenizer'"):
        BPETokenizer.from_dict({"kind": "bpe"})


def test_bpe_encode_batch_matches_encode(small_bpe):
    """encode_batch equals encode on each text, bos/eos included."""
    expected = [small_bpe.encode(t, bos=True, eos=True) for t in TRICKY]
    assert small_bpe.encode_batch(TRICKY, bos=True, eos=True) == expected


def test_bpe_cut_character_decodes_to_replacement(small_bpe):
    """Half of a multi-byte character (as a model might emit) decodes to U+FFFD, not an exception."""
    ids = small_bpe.encode("好")
    assert len(ids) > 1
    assert "\ufffd" in small_bpe.decode(ids[:-1])


# --------------------------------------------------------------------------------------------
# interface, dispatch and pairs
# --------------------------------------------------------------------------------------------


def test_both_tokenizers_satisfy_the_protocol(small_bpe):
    """CharTokenizer and BPETokenizer are Tokenizers with the same special ids."""
    char = CharTokenizer.train(SMALL_CORPUS)
    for tok in (char, small_bpe):
        assert isinstance(tok, Tokenizer)
        assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)


def test_tokenizer_from_dict_dispatches_on_kind(small_bpe):
    """kind "char" and "bpe" load back to equal tokenizers; an unknown kind lists the allowed ones."""
    char = CharTokenizer.train(SMALL_CORPUS)
    assert tokenizer_from_dict(char.to_dict()) == char
    assert tokenizer_from_dict(small_bpe.to_dict()) == small_bpe
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'; allowed kinds: 'char', 'bpe'"):
        tokenizer_from_dict({"kind": "wordpiece"})
    with pytest.raises(ValueError, match="unknown tokenizer kind None"):
        tokenizer_from_dict({})


def test_train_tokenizer_kinds():
    """train_tokenizer builds either kind and names an unknown one."""
    assert isinstance(train_tokenizer(SMALL_CORPUS, kind="char"), CharTokenizer)
    assert isinstance(train_tokenizer(SMALL_CORPUS, kind="bpe", vocab_size=280), BPETokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'word'"):
        train_tokenizer(SMALL_CORPUS, kind="word")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_pair_shared_and_separate(kind):
    """A shared pair is one object over both sides; separate tokenizers see only their side."""
    pairs = [("Hello world.", "你好世界。"), ("Good night.", "晚安。")] * 10
    shared = train_tokenizer_pair(pairs, kind=kind, vocab_size=270, shared=True)
    assert shared.shared and shared.source.encode("你") == shared.target.encode("你")
    separate = train_tokenizer_pair(pairs, kind=kind, vocab_size=270, shared=False)
    assert not separate.shared
    for source, target in pairs:
        assert separate.source.decode(separate.source.encode(source)) == source
        assert separate.target.decode(separate.target.encode(target)) == target
    if kind == "char":
        assert separate.source.encode("你") == [separate.source.unk_id]


@pytest.mark.parametrize("shared", [True, False])
def test_tokenizer_pair_save_and_load(shared):
    """TokenizerPair.to_dict is JSON-able and loads back equal, sharing preserved."""
    pair = train_tokenizer_pair([("a b c", "一二三")] * 5, kind="bpe", vocab_size=270, shared=shared)
    loaded = TokenizerPair.from_dict(json.loads(json.dumps(pair.to_dict())))
    assert loaded.shared == shared
    assert loaded.source == pair.source and loaded.target == pair.target
    with pytest.raises(ValueError, match="needs 'shared'"):
        TokenizerPair.from_dict({"source": {}})


# --------------------------------------------------------------------------------------------
# real corpora
# --------------------------------------------------------------------------------------------


def test_bpe_round_trip_on_tatoeba(cmn_bpe, cmn_texts):
    """Every English and Chinese side of cmn.txt survives encode_batch -> decode exactly, in good time."""
    start = time.perf_counter()
    encoded = cmn_bpe.encode_batch(cmn_texts)
    assert time.perf_counter() - start < 10.0  # ~58,800 texts; about half a second on two cores
    assert [cmn_bpe.decode(ids) for ids in encoded] == cmn_texts
    assert all(3 not in ids for ids in encoded)  # byte-level: nothing is unknown


def test_char_round_trip_on_tatoeba(cmn_texts):
    """A character tokenizer trained on cmn.txt round-trips every side of it."""
    tok = CharTokenizer.train(cmn_texts)
    assert all(tok.decode(tok.encode(text)) == text for text in cmn_texts)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_on_tinyshakespeare(kind, shakespeare_lines, request):
    """A slice of tinyshakespeare round-trips with a tokenizer trained on it and with the cmn BPE."""
    text = "\n".join(shakespeare_lines)
    tok = train_tokenizer([text], kind=kind, vocab_size=1000)
    assert tok.decode(tok.encode(text)) == text
    if kind == "char":
        assert tok.vocab_size == 4 + len(set(text))
    else:
        cmn_bpe = request.getfixturevalue("cmn_bpe")
        assert cmn_bpe.decode(cmn_bpe.encode(text)) == text  # trained elsewhere, still exact


@pytest.mark.parametrize("copy_fn", ["deepcopy", "pickle"])
def test_a_copied_bpe_tokenizer_encodes_special_token_text_as_text(small_bpe, copy_fn):
    """Special-token strings in a text stay text after copy.deepcopy or pickling (the backend's JSON
    does not hold the flag that says so; refusal evaluation deep-copies models with their tokenizer)."""
    import copy
    import pickle

    copied = copy.deepcopy(small_bpe) if copy_fn == "deepcopy" else pickle.loads(pickle.dumps(small_bpe))
    text = "Robert <unk> is an <eos> actor <pad>"
    assert copied.encode(text) == small_bpe.encode(text)
    assert copied.decode(copied.encode(text)) == text
