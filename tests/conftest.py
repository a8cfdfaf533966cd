"""Shared fixtures: factories for tiny models built with a fixed seed, in eval mode; the real corpora."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moeformer import DecoderLM, Seq2SeqTransformer, preset

TINY_VOCAB = 37


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="device for tests/test_device.py (the checks that matter on an accelerator): cpu (default) or cuda",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device ``--device`` names; fails at once when it is not available."""
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    if not name.startswith(("cpu", "cuda")):
        pytest.fail(f"--device {name!r}: allowed: cpu, cuda, cuda:N")
    return torch.device(name)


@pytest.fixture
def single_thread():
    """Run on one intra-op thread: on a busy 2-core machine, OpenMP hand-offs make each op on
    these tiny tensors ~1000x slower than the math itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_seq2seq():
    """Factory: a "transformer-tiny" Seq2SeqTransformer (vocab 37, seed 0), overrides allowed."""

    def make(seed: int = 0, **overrides) -> Seq2SeqTransformer:
        torch.manual_seed(seed)
        config = preset("transformer-tiny", vocab_size=overrides.pop("vocab_size", TINY_VOCAB), **overrides)
        return Seq2SeqTransformer(config).eval()

    return make


@pytest.fixture
def make_lm():
    """Factory: an "lm-tiny" DecoderLM (vocab 37, seed 0), overrides allowed."""

    def make(seed: int = 0, **overrides) -> DecoderLM:
        torch.manual_seed(seed)
        config = preset("lm-tiny", vocab_size=overrides.pop("vocab_size", TINY_VOCAB), **overrides)
        return DecoderLM(config).eval()

    return make


@pytest.fixture(scope="session")
def shared_data() -> Callable[..., Path]:
    """Locator for a file of the real corpora (MOEFORMER_DATA or ../shared/data); skips when absent."""
    root = Path(os.environ.get("MOEFORMER_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")

    def locate(*parts: str) -> Path:
        path = root.joinpath(*parts)
        if not path.exists():
            pytest.skip(f"real corpus {path} not found; set MOEFORMER_DATA to the folder holding {parts[0]}/")
        return path

    return locate
