"""The ``[data]`` table: which corpus, how it is cleaned, split and tokenised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeformer.data.chinese import ZH_SCRIPTS, ZhScript, is_chinese
from moeformer.validation import ConfigError, check_field_types, positive


@dataclass(kw_only=True)
class DataConfig:
    # synthetic: the generated English->Chinese numbers/dates corpus; tatoeba / tsv / jsonl:
    # parallel text at ``path``; text: a plain-text corpus for language modelling
    corpus: Literal["synthetic", "tatoeba", "tsv", "jsonl", "text"] = "synthetic"
    # file (or, for "text", a directory of *.txt) to read; not used by "synthetic". In a config
    # file a relative path is read from the config file's directory; with --set, from the
    # current directory (see moeformer.config.load_config)
    path: str | None = None
    # more than this fraction of the lines read being defective (not UTF-8, no tab, empty field,
    # bad JSON, ...; see moeformer.data.report) stops the run before any training
    max_rejected_fraction: float = 0.01
    source_lang: str = "en"  # "zh*": the source side is cleaned (and converted) as Chinese
    target_lang: str = "zh"  # decides the BLEU tokenizer ("zh" for Chinese) and the Chinese side
    # the script of the Chinese side(s) of parallel data, converted by OpenCC (and of the
    # references in evaluation's script-normalised scores); "keep": no conversion
    zh_script: ZhScript = "keep"
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: int = 8000  # bpe only
    shared_vocab: bool = True  # translation: one tokenizer for source and target
    synthetic_pairs: int = 20000
    valid_size: int = 500  # examples (pairs, or LM windows) held out for validation
    test_size: int = 1000
    max_chars: int = 200  # cleaning: longest sentence kept, in characters
    seq_len: int = 256  # language modelling: tokens per training window
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("vocab_size", "synthetic_pairs", "max_chars", "seq_len"):
            positive(name, getattr(self, name))
        for name in ("valid_size", "test_size"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise ConfigError(
                "max_rejected_fraction",
                f"must be in [0, 1] (0: no defective line allowed, 1: never stop), got {self.max_rejected_fraction}",
            )
        if self.corpus != "synthetic" and self.path is None:
            raise ConfigError("path", f"corpus {self.corpus!r} reads a file: set path (or use corpus 'synthetic')")
        self._check_zh_script()

    def _check_zh_script(self) -> None:
        """A script other than "keep" needs a Chinese side of parallel text to convert."""
        if self.zh_script == "keep":
            return
        if not self.is_translation:
            raise ConfigError("zh_script", f"{self.zh_script!r} converts parallel text; corpus 'text' needs 'keep'")
        if self.chinese_sides == "none":
            raise ConfigError(
                "zh_script",
                f"{self.zh_script!r} converts the Chinese side, but neither source_lang ({self.source_lang!r}) nor "
                f"target_lang ({self.target_lang!r}) is Chinese ('zh', 'zh-CN', ...); use 'keep' "
                f"(allowed: {', '.join(map(repr, ZH_SCRIPTS))})",
            )

    @property
    def chinese_sides(self) -> Literal["none", "source", "target", "both"]:
        """Which sides of the pairs are Chinese text, by ``source_lang`` and ``target_lang``."""
        src, tgt = is_chinese(self.source_lang), is_chinese(self.target_lang)
        return "both" if src and tgt else "source" if src else "target" if tgt else "none"

    @property
    def is_translation(self) -> bool:
        return self.corpus != "text"
