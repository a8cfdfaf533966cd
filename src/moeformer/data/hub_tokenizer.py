"""A Hugging Face Hub model's own tokenizer (``tokenizer.json``), behind moeformer's tokenizer interface.

Imported checkpoints (:mod:`moeformer.interop`) keep the tokenizer their weights were trained
with; its special ids are whatever the model uses, read from ``tokenizer_config.json`` (or
``config.json``), not moeformer's pad 0 / bos 1 / eos 2 / unk 3. A model without a BOS token
(Qwen2) has ``bos_id = -1`` and ``encode(bos=True)`` adds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer


@dataclass(frozen=True, eq=False)
class HubTokenizer:
    backend: HFTokenizer
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int

    @classmethod
    def from_directory(cls, path: str | Path) -> HubTokenizer:
        """The tokenizer of a transformers checkpoint directory (``tokenizer.json`` + its configs)."""
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json (only fast tokenizers can be read)")
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        settings = _json(path / "tokenizer_config.json")
        model = _json(path / "config.json")
        ids = {}
        for name in ("pad", "bos", "eos", "unk"):
            token = settings.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            found = backend.token_to_id(token) if isinstance(token, str) else None
            fallback = model.get(f"{name}_token_id")
            ids[name] = found if found is not None else fallback if isinstance(fallback, int) else -1
        if ids["eos"] < 0:
            raise ValueError(f"{path}: no eos token in tokenizer_config.json or config.json")
        if ids["pad"] < 0:
            ids["pad"] = ids["eos"]  # the common convention for LMs trained without padding
        return cls(backend, ids["pad"], ids["bos"], ids["eos"], ids["unk"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if bos and self.bos_id >= 0 else []
        return head + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text up to the first EOS, special tokens skipped."""
        kept = []
        for i in ids:
            if i == self.eos_id:
                break
            kept.append(i)
        return self.backend.decode(kept, skip_special_tokens=True)

    def to_dict(self) -> dict[str, object]:
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id}
        return {"kind": "hub", "tokenizer": self.backend.to_str(), **ids}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HubTokenizer:
        if data.get("kind") != "hub" or not isinstance(data.get("tokenizer"), str):
            raise ValueError("hub tokenizer data needs kind 'hub' and 'tokenizer': the tokenizer.json string")
        ids = [int(data[k]) for k in ("pad_id", "bos_id", "eos_id", "unk_id")]
        return cls(HFTokenizer.from_str(data["tokenizer"]), *ids)


def _json(file: Path) -> dict[str, Any]:
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
