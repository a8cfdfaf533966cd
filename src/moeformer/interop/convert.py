"""Reading and writing Hugging Face checkpoints: a local transformers directory <-> a DecoderLM.

    model = import_hf("path/to/Qwen2-MoE")            # config.json + *.safetensors, no transformers needed
    export_hf(model, "out/qwen2-moe", tokenizer=tok)   # loadable by AutoModelForCausalLM.from_pretrained

Both check everything they can before touching a tensor: the config is mapped (or refused with
the reason) first, then every tensor name the model needs is looked up in the checkpoint's index,
then the tensors are read. Writes go through :func:`moeformer.publish.staged_dir`, so an
interrupted export leaves no half-written checkpoint, and an existing directory is replaced only
with ``force`` and only if this project or transformers wrote it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from moeformer.interop.hf_config import InteropError, config_from_hf, model_type
from moeformer.interop.hf_family import config_to_hf, family_for
from moeformer.interop.hf_weights import build_rules, mtp_shared_names
from moeformer.model_config import ModelConfig, MTPConfig
from moeformer.models.decoder import DecoderLM
from moeformer.models.embedder import rotary_embedding
from moeformer.moe.router import Router
from moeformer.publish import check_replaceable, staged_dir

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a transformers checkpoint directory, with errors that name the file."""
    path = Path(path)
    if not path.is_dir():
        raise InteropError(f"{path}: no such checkpoint directory")
    file = path / "config.json"
    if not file.exists():
        raise InteropError(f"{path}: no config.json (a transformers checkpoint has config.json + *.safetensors)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InteropError(f"{file}: not valid JSON ({err})") from None


def tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or shards listed by the index)."""
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise InteropError(f"{path / INDEX}: not a safetensors index ({err})") from None
        return {name: path / file for name, file in weight_map.items()}
    if (path / WEIGHTS).exists():
        try:
            with safetensors.safe_open(str(path / WEIGHTS), "pt") as f:
                return {name: path / WEIGHTS for name in f.keys()}
        except (safetensors.SafetensorError, OSError) as err:
            raise InteropError(f"{path / WEIGHTS}: unreadable or truncated safetensors file ({err})") from None
    found = sorted(p.name for p in path.iterdir())
    raise InteropError(f"{path}: no {WEIGHTS} or {INDEX} (found {found[:6]}); only safetensors checkpoints are read")


def import_hf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> DecoderLM:
    """A DecoderLM (in eval mode) with the weights of the transformers checkpoint at ``path``."""
    path = Path(path)
    hf = read_hf_config(path)
    files = tensor_files(path)
    config = _with_mtp(config_from_hf(hf), hf, files)
    family = model_type(hf)
    rules = build_rules(config, family, rope_interleave=bool(hf.get("rope_interleave", True))).rules
    missing = [name for rule in rules for name in rule.theirs if name not in files]
    if missing:
        raise InteropError(f"{path}: {len(missing)} tensors the {family} config needs are missing, e.g. {missing[:4]}")
    copies = {theirs: ours for theirs, ours in mtp_shared_names(config).items() if theirs in files}
    used = {name for rule in rules for name in rule.theirs} | set(copies)
    extra = [name for name in files if name not in used and not _ignorable(name, config, hf)]
    if extra:
        raise InteropError(f"{path}: {len(extra)} tensors have no place in the model, e.g. {sorted(extra)[:4]}")
    tensors = _read(files, used)
    state = {}
    for rule in rules:
        state[rule.ours] = rule.join([tensors.pop(name) for name in rule.theirs]).to(dtype)
    for theirs, ours in copies.items():  # MTP layers' copies of the embedding and head: we share one tensor
        if not torch.equal(tensors.pop(theirs).to(dtype), state.get(ours, state["embedding.embed.weight"])):
            raise InteropError(f"{path}: {theirs} differs from the main model's {ours}; moeformer's MTP modules "
                               "share the embedding and output head, as DeepSeek-V3 trains them")  # fmt: skip
    with torch.device("meta"):  # no random initialisation, no second copy of the weights
        model = DecoderLM(config)
    _check_shapes(model, state, rules, path)
    missing_ours, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left = [k for k in missing_ours if not k.endswith("router.expert_bias") and k != "lm_head.weight"]
    if left or unexpected:  # a bug in the rules, not in the file
        raise InteropError(f"internal: {family} weights not mapped: missing {left[:4]}, unexpected {unexpected[:4]}")
    _materialise(model, config, dtype)
    return model.eval()


def _check_shapes(model: DecoderLM, state: dict[str, torch.Tensor], rules: list, path: Path) -> None:
    """Every tensor has the shape config.json implies, or the error names it (a mismatched config)."""
    expected = model.state_dict()
    for rule in rules:
        want, got = tuple(expected[rule.ours].shape), tuple(state[rule.ours].shape)
        if want != got:
            raise InteropError(
                f"{path}: {rule.theirs[0]}{' (and others)' if len(rule.theirs) > 1 else ''} has shape {got}, "
                f"but config.json implies {want} for {rule.ours}; the config does not describe these weights"
            )


def _materialise(model: DecoderLM, config: ModelConfig, dtype: torch.dtype) -> None:
    """What the checkpoint does not hold, on the CPU: the RoPE table, zero balancing biases, the tie."""
    model.embedding.rotary = rotary_embedding(config)  # not a persistent buffer: rebuilt from the config
    for module in model.modules():
        if isinstance(module, Router) and module.expert_bias.is_meta:
            module.expert_bias = torch.zeros(module.n_experts)
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.embed.weight
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise InteropError(f"internal: tensors left unset by the import: {left[:4]}")
    model.to(dtype)  # norms and buffers created above; the router bias stays float32 (Router._apply)


def _with_mtp(config: ModelConfig, hf: dict[str, Any], files: dict[str, Path]) -> ModelConfig:
    """The config with the MTP modules the checkpoint holds (config.json may announce some that
    transformers never saved: those are left out, as transformers leaves them)."""
    announced = int(hf.get("num_nextn_predict_layers") or 0)
    present = 0
    while present < announced and f"model.layers.{config.n_layers + present}.eh_proj.weight" in files:
        present += 1
    return dataclasses.replace(config, mtp=MTPConfig(depth=present)) if present else config


def _ignorable(name: str, config: ModelConfig, hf: dict[str, Any]) -> bool:
    """Tensors a faithful import may leave out: RoPE tables, a tied head, DeepSeek's MTP layers."""
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings):
        return True
    parts = name.split(".")
    if name.startswith("model.layers.") and int(parts[2]) >= config.n_layers:
        return bool(hf.get("num_nextn_predict_layers"))  # multi-token prediction heads, training only
    return False


def _read(files: dict[str, Path], names: set[str]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        try:
            with safetensors.safe_open(str(file), "pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key).float()
        except (safetensors.SafetensorError, OSError) as err:
            raise InteropError(f"{file}: unreadable or truncated safetensors file ({err})") from None
    return out


def export_hf(model: DecoderLM, out: str | Path, *, tokenizer: Any = None, force: bool = False) -> str:
    """Write ``model`` as a transformers checkpoint directory; returns the family (``model_type``).

    ``tokenizer``: a moeformer BPE tokenizer, saved as ``tokenizer.json`` for
    ``AutoTokenizer.from_pretrained``. Refuses (InteropError) a model no family can compute.
    """
    out = Path(out)
    config = model.config
    family = family_for(config)
    check_replaceable(out, force=force)
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    _check_bias(state, family)
    hf_config = config_to_hf(config, family)
    tensors: dict[str, torch.Tensor] = {}
    for rule in build_rules(config, family).rules:
        for name, tensor in zip(rule.theirs, rule.split(state[rule.ours]), strict=True):
            tensors[name] = tensor.contiguous().clone()
    for theirs, ours in mtp_shared_names(config).items():  # DeepSeek-V3 stores them again in each MTP layer
        tensors[theirs] = state[ours].contiguous().clone()
    if family == "qwen2_moe" and not config.moe.shared_gate:
        _open_shared_gates(tensors, config)
    hf_config.update(experts_kernel(config))
    with staged_dir(out, force=force) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            hf_config.update(_write_tokenizer(tmp, tokenizer))
        hf_config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    return family


def experts_kernel(config: ModelConfig) -> dict[str, str]:
    """``experts_implementation`` for config.json where transformers' default MoE kernel cannot run.

    transformers runs routed experts with ``grouped_mm`` by default, which needs every weight
    stride to be a multiple of 16 bytes: expert width and d_model multiples of 8 elements (2-byte
    dtypes; 4 for float32). Other widths (the shipped DeepSeekMoE preset's 86) load but fail on
    the first forward, so the saved config asks for the plain loop ("eager") that
    ``from_pretrained`` reads from config.json.
    """
    if config.moe is None:
        return {}
    widths = (config.moe.expert_width(config.ffn.d_ff), config.d_model)
    return {"experts_implementation": "eager"} if any(w % 8 for w in widths) else {}


def _check_bias(state: dict[str, torch.Tensor], family: str) -> None:
    if family == "deepseek_v3":
        return
    for name, value in state.items():
        if name.endswith("router.expert_bias") and value.abs().max() > 0:
            raise InteropError(
                f"{name} is non-zero (auxiliary-loss-free balancing): it steers expert choice, and {family} "
                "has no such bias; only DeepSeek-V3 (MLA + sigmoid routing) keeps it"
            )


def _open_shared_gates(tensors: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Ungated shared experts as Qwen2-MoE's gated one, exactly: gate weight 0 gives sigmoid(0) = 1/2,
    and doubling down_proj (a power of two: no rounding) restores the full contribution."""
    for i in range(config.n_layers):
        if not config.moe.is_moe_layer(i):
            continue
        block = f"model.layers.{i}.mlp."
        tensors[block + "shared_expert_gate.weight"] = torch.zeros(1, config.d_model)
        tensors[block + "shared_expert.down_proj.weight"] *= 2


def _write_tokenizer(directory: Path, tokenizer: Any) -> dict[str, Any]:
    """tokenizer.json + tokenizer_config.json of a tokenizers-backed tokenizer (moeformer's BPE, or
    an imported model's own); returns the special ids for config.json."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        raise InteropError(f"a {type(tokenizer).__name__} has no tokenizer.json form; export without a tokenizer")
    (directory / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    meta: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    ids: dict[str, Any] = {}
    for name in ("pad", "bos", "eos", "unk"):
        token_id = getattr(tokenizer, f"{name}_id")
        if token_id >= 0:
            meta[f"{name}_token"] = backend.id_to_token(token_id)
            if name != "unk":
                ids[f"{name}_token_id"] = token_id
    (directory / "tokenizer_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return ids
