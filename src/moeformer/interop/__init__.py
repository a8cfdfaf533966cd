"""Hugging Face transformers interop: import Llama, Qwen2/3, Mixtral, Qwen2/3-MoE, DeepSeek-V2 and -V3
checkpoints as :class:`~moeformer.models.decoder.DecoderLM`, and export DecoderLMs back.

Reading and writing use ``safetensors`` and JSON only; transformers itself is needed only to load
the exported directory (and by the tests that check logits against it).
"""

from moeformer.interop.convert import export_hf, import_hf, read_hf_config
from moeformer.interop.hf_config import FAMILIES, InteropError, config_from_hf
from moeformer.interop.hf_family import config_to_hf, family_for

__all__ = [
    "FAMILIES",
    "InteropError",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "family_for",
    "import_hf",
    "read_hf_config",
]
