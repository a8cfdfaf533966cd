"""The orthogonalization as a rank-one LoRA adapter (PEFT format) instead of a full copy of the model.

The edit of every writer vector v <- v - alpha_l (v . r_hat) r_hat (:mod:`moeformer.refusal.edits`)
is, for a whole matrix, a rank-one update:

    output projection W (D, in):  W' = W + B A,  B = -r_hat (D, 1),  A = alpha_l r_hat^T W (1, in)
    embedding E (V, D):           E' = E + (B A)^T,  B = -r_hat (D, 1),  A = alpha_0 (E r_hat)^T (1, V)

which PEFT's LoRA computes exactly with r = 1 and lora_alpha = 1 (scaling 1): ``lora_A`` / ``lora_B``
for ``nn.Linear``, ``lora_embedding_A`` / ``lora_embedding_B`` for ``nn.Embedding``. The adapter
(a few vectors per layer) loads with ``peft.PeftModel.from_pretrained(base, adapter_dir)`` on the
unmodified model and gives the edited model's logits (a test: < 1e-4 in float32). A tied output
layer is not touched (LoRA on the embedding changes only the lookup), as the full edit unties it.

What LoRA cannot express is refused before anything is written: ``norm-preserving`` (not rank
one), biases of writer modules (LoRA leaves biases alone), and routed experts held as fused 3-D
tensors (transformers 5's MoE layout: no ``nn.Linear`` per expert for LoRA to wrap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from moeformer.publish import staged_dir
from moeformer.refusal.edits import Method, StrengthKernel, writer_layer
from moeformer.refusal.hf import HFChatLM
from moeformer.refusal.interventions import unit
from moeformer.refusal.lm import ChatLM, RefusalError
from moeformer.refusal.orthogonalize import effective_direction, orthogonalize
from moeformer.results import check_output

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_weights(
    lm: ChatLM,
    direction: Tensor,
    *,
    method: Method = "orthogonal",
    kernel: StrengthKernel | None = None,
    harmless_mean: Tensor | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """(PEFT adapter state dict, target module names) of the edit; nothing in ``lm`` changes."""
    if not isinstance(lm, HFChatLM):
        raise RefusalError("--as-lora writes PEFT adapters for Hugging Face models; moeformer checkpoints are "
                           "edited in full (orthogonalize without --as-lora)")  # fmt: skip
    if method == "norm-preserving":
        raise RefusalError("norm-preserving rescales every edited vector, which is not a rank-one update: LoRA "
                           "cannot express it; use orthogonalize without --as-lora")  # fmt: skip
    r_hat = unit(effective_direction(lm, direction, method, harmless_mean)).cpu()
    modules = dict(lm.model.named_modules())
    weights: dict[str, Tensor] = {}
    targets: list[str] = []
    for w in lm.writer_weights():
        module_name, _, leaf = w.name.rpartition(".")
        module = modules.get(module_name)
        alpha = 1.0 if kernel is None else kernel.alpha(writer_layer(w.name))
        _check_expressible(w.name, leaf, module)
        param = w.param.detach().float().cpu()
        prefix = f"base_model.model.{module_name}"
        if isinstance(module, nn.Embedding):
            weights[f"{prefix}.lora_embedding_A"] = (alpha * (param @ r_hat))[None, :]  # (1, V)
            weights[f"{prefix}.lora_embedding_B"] = -r_hat[:, None]  # (D, 1)
        else:
            weights[f"{prefix}.lora_A.weight"] = (alpha * (r_hat @ param))[None, :]  # (1, in)
            weights[f"{prefix}.lora_B.weight"] = -r_hat[:, None]  # (D, 1)
        targets.append(module_name)
    return {k: v.contiguous() for k, v in weights.items()}, targets


def _check_expressible(name: str, leaf: str, module: nn.Module | None) -> None:
    if leaf == "bias":
        raise RefusalError(f"{name}: the model has a bias on a module that writes to the residual stream; LoRA "
                           "leaves biases alone, so the adapter would not be the edit; use orthogonalize without "
                           "--as-lora")  # fmt: skip
    if leaf != "weight" or not isinstance(module, nn.Linear | nn.Embedding):
        raise RefusalError(f"{name}: not the weight of an nn.Linear or nn.Embedding (fused 3-D expert tensors are "
                           "transformers 5's MoE layout), so PEFT's LoRA cannot carry its edit; use orthogonalize "
                           "without --as-lora (or --stream)")  # fmt: skip


def save_lora(
    lm: ChatLM,
    direction: Tensor,
    out: str | Path,
    *,
    source: str | Path | None = None,
    force: bool = False,
    check_prompts: list[str] | None = None,
    **edit: Any,
) -> Path:
    """Write the edit of ``direction`` as a PEFT LoRA adapter directory (adapter_config.json +
    adapter_model.safetensors); ``edit``: ``method``, ``kernel``, ``harmless_mean`` as for
    :func:`lora_weights`. Everything is checked before anything is written.

    ``check_prompts``: then ``lm`` is also orthogonalized in place (after the adapter is computed)
    and its residual stream checked on them, as the full edit is: an architecture whose writers
    this edit cannot reach (e.g. Gemma-2's norms after each sublayer) is refused, not given an
    adapter that does not remove the direction. Skipped with a strength kernel (partial on purpose).
    """
    try:
        import peft
    except ImportError:
        raise RefusalError("--as-lora needs the peft package: pip install 'moeformer[hf]'") from None
    weights, targets = lora_weights(lm, direction, **edit)
    if check_prompts is not None and edit.get("kernel") is None:
        orthogonalize(lm, direction, check_prompts, method=edit.get("method", "orthogonal"),
                      harmless_mean=edit.get("harmless_mean"))  # fmt: skip
    check_output(out, force=force, source=source, model_output=True)
    config = peft.LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, bias="none", target_modules=targets,
                             base_model_name_or_path=None if source is None else str(source))  # fmt: skip
    with staged_dir(out, force=force) as tmp:
        config.save_pretrained(str(tmp))
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out)
