"""Using a checkpoint: long inputs split or refused with the limit and the length, blank inputs kept,
the wrong kind of model and a missing tokenizer refused clearly, a weights-only checkpoint loaded."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from moeformer.config import config_to_dict
from moeformer.data.char_tokenizer import CharTokenizer
from moeformer.data.sentences import join_sentences, split_sentences
from moeformer.data.tokenizer import TokenizerPair
from moeformer.inference import MissingTokenizerError, generate, load_model, translate
from moeformer.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHABET = "abcdefghij .!?。你好"


@pytest.fixture
def chars() -> TokenizerPair:
    tok = CharTokenizer.train([ALPHABET])
    return TokenizerPair(tok, tok)


@pytest.fixture
def seq2seq(make_seq2seq, chars):
    return make_seq2seq(vocab_size=chars.source.vocab_size, max_seq_len=16)


def test_sentences_split_at_sentence_ends_and_join_back():
    assert split_sentences("Hi. Pi is 3.14! 你好。再见！ tail") == ["Hi.", "Pi is 3.14!", "你好。", "再见！", "tail"]
    assert split_sentences("  \t") == []
    assert join_sentences(["Hello.", "World."]) == "Hello. World."
    assert join_sentences(["你好。", "再见！"]) == "你好。再见！"


def test_a_long_input_is_translated_sentence_by_sentence_with_a_note(seq2seq, chars):
    long = " ".join(["abc def."] * 6)  # 53 characters + EOS: over the 16 positions
    notes: list[str] = []
    out = translate(seq2seq, chars, [long, "abc def."], note=notes.append)
    assert len(out) == 2
    assert len(notes) == 1 and "input 1 has 54 tokens" in notes[0] and "limit of 16" in notes[0]
    assert "6 sentences" in notes[0]
    alone = translate(seq2seq, chars, ["abc def."])[0]
    assert out[1] == alone and out[0] == join_sentences([alone] * 6)


def test_a_sentence_longer_than_the_model_is_refused_before_decoding(seq2seq, chars, monkeypatch):
    monkeypatch.setattr("moeformer.decode.text._translate_ids", lambda *a: pytest.fail("decoded before checking"))
    with pytest.raises(ValueError, match=r"input 2: a sentence of 21 tokens .* longer than the model's limit of 16"):
        translate(seq2seq, chars, ["abc.", "abcdefghij abcdefghi"])
    with pytest.raises(ValueError, match=r"input 1: a sentence of 23 tokens .* starting 'abcdefghij abcdefghij.'"):
        translate(seq2seq, chars, ["abc. abcdefghij abcdefghij. abc."])


def test_a_sentence_longer_than_the_model_may_be_cut_with_a_note(seq2seq, chars):
    """overlong="cut": for scoring a test set after training, where refusing would lose the run's scores."""
    notes: list[str] = []
    out = translate(seq2seq, chars, ["abcdefghij abcdefghi"], overlong="cut", note=notes.append)
    assert out == translate(seq2seq, chars, ["abcdefghij abcd"])  # 15 characters + EOS
    assert notes == ["input 1: a sentence of 21 tokens (end of sentence included) starting 'abcdefghij abcdefghi' "
                     "was cut to the model's limit of 16 tokens"]  # fmt: skip


def test_blank_inputs_give_blank_outputs_in_place(seq2seq, chars):
    out = translate(seq2seq, chars, ["abc", "", "  ", "def"], beam_size=2)
    assert len(out) == 4 and out[1] == out[2] == ""
    assert out[0] == translate(seq2seq, chars, ["abc"], beam_size=2)[0]


def test_a_prompt_longer_than_the_model_is_refused(make_lm, chars):
    lm = make_lm(vocab_size=chars.source.vocab_size, max_seq_len=16)
    with pytest.raises(ValueError, match=r"prompt has 16 tokens; the model reads at most 16 .* at most 15"):
        generate(lm, chars, "abcdefghij abcde")


def test_generation_says_when_it_stops_at_the_model_limit(make_lm, chars):
    lm = make_lm(vocab_size=chars.source.vocab_size, max_seq_len=16)
    eos = torch.tensor([chars.source.eos_id])
    lm.lm_head.register_forward_hook(lambda m, i, logits: logits.index_fill(-1, eos, -1e9))  # only the limit stops it
    notes: list[str] = []
    text = generate(lm, chars, "abcd", max_new_tokens=1000, seed=0, temperature=0.0, note=notes.append)
    assert len(text) <= 12
    assert notes == ["stopped after 12 new tokens (of 1000 asked for): the model's limit is 16 positions "
                     "and the prompt takes 4"]  # fmt: skip
    notes.clear()
    generate(lm, chars, "abcd", max_new_tokens=5, seed=0, note=notes.append)
    assert notes == []


def test_the_wrong_kind_of_model_is_refused_clearly(make_lm, seq2seq, chars):
    lm = make_lm(vocab_size=chars.source.vocab_size)
    with pytest.raises(ValueError, match="translate needs an encoder-decoder .* decoder-only LM .*`generate`"):
        translate(lm, chars, ["abc"])
    with pytest.raises(ValueError, match="generate needs a decoder-only LM; .* encoder-decoder .*`translate`"):
        generate(seq2seq, chars, "abc")


def write_tokenizer_json(directory, vocab_size: int) -> None:
    """A word-level tokenizer.json with eos last (as a Hub model's)."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"</s>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def test_a_weights_only_checkpoint_loads_and_takes_a_tokenizer(make_lm, tmp_path):
    lm = make_lm()  # vocab 37
    save_checkpoint(tmp_path / "run", 0, lm, {"config": {"model": config_to_dict(lm.config)}}, {}, best=True)
    loaded = load_model(tmp_path / "run")
    assert loaded.tokenizer_pair is None
    with pytest.raises(MissingTokenizerError, match="no tokenizer .* --tokenizer PATH"):
        loaded.tokenizers  # noqa: B018
    write_tokenizer_json(tmp_path / "tok", 37)
    for given in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_model(tmp_path / "run", tokenizer=given)
        assert loaded.tokenizers.source.eos_id == 36
        assert generate(loaded.model, loaded.tokenizers, "w1 w2", max_new_tokens=3, seed=0) is not None
    write_tokenizer_json(tmp_path / "big", 50)
    with pytest.raises(ValueError, match="the tokenizer has 50 tokens but the model's vocabulary has 37"):
        load_model(tmp_path / "run", tokenizer=tmp_path / "big")
    with pytest.raises(FileNotFoundError, match="expected a tokenizer.json or a directory holding one"):
        load_model(tmp_path / "run", tokenizer=tmp_path)
