"""Greedy decoding edge cases: zero new tokens, and prompts padded on the wrong side."""

from __future__ import annotations

import pytest
import torch

from moeformer import build_model, preset
from moeformer.decode import greedy_generate


def test_zero_new_tokens_gives_an_empty_result():
    model = build_model(preset("lm-tiny", vocab_size=30)).eval()
    out = greedy_generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=0)
    assert out.shape == (1, 0)


def test_right_padded_prompt_is_refused():
    model = build_model(preset("lm-tiny", vocab_size=30)).eval()
    prompt = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        greedy_generate(model, prompt, max_new_tokens=2, padding_mask=prompt == 0)
