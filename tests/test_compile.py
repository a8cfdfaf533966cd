"""torch.compile for training: an MoE model traces as one graph, compiled equals eager (loss,
logits, every gradient), and ``train.compile`` trains and saves like eager.

CPU compilation is slow (inductor writes and builds C++ kernels: about a minute per model on a
cold cache here), so most checks use the ``aot_eager`` backend: dynamo and AOTAutograd (graph
capture, the experts' custom ops and their fake kernels, the joint forward-backward graph) without
code generation. Inductor runs on one model by default; the full matrix is marked slow.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from moeformer import DecoderLM, preset
from moeformer.compiled import CompiledModel
from moeformer.train.config import TrainConfig
from moeformer.train.loss import smoothed_cross_entropy
from moeformer.train.trainer import Batch, Trainer, TrainingTask
from moeformer.validation import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 37
FFNS = {
    "dense": None,
    "topk": {"kind": "topk", "n_experts": 4, "top_k": 2, "balance_loss": 0.01, "capacity_factor": 1.25},
    "deepseek": {"kind": "deepseek", "n_experts": 8, "top_k": 2, "n_shared": 1, "score": "sigmoid",
                 "bias_update_rate": 1e-3, "balance_loss": 0.01, "seq_balance_loss": 1e-3},
}  # fmt: skip
ATTENTIONS = {"mha": "lm-tiny", "mla": "lm-tiny-mla"}


def tiny_lm(attention: str, ffn: str, **overrides) -> DecoderLM:
    """A tiny decoder LM in training mode, without dropout (compiled dropout draws other masks)."""
    torch.manual_seed(0)
    moe = {"moe": FFNS[ffn]} if FFNS[ffn] else {}
    return DecoderLM(preset(ATTENTIONS[attention], vocab_size=VOCAB, dropout=0.0, **moe, **overrides)).train()


def inputs(padded: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (3, 10), generator=g)
    if not padded:
        return {"tokens": tokens}
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :4] = True  # left padding on one row: routed to no expert
    return {"tokens": tokens.masked_fill(mask, 0), "padding_mask": mask}


def train_step(forward, model: DecoderLM, batch: dict[str, torch.Tensor]):  # noqa: ANN001
    """(loss incl. aux, logits, gradients by name) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    out = forward(**batch)
    target = torch.roll(batch["tokens"], -1, dims=1)
    loss, _ = smoothed_cross_entropy(out.logits, target, pad_id=0, eps=0.1)
    total = loss + out.aux_loss
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), out.logits.detach(), grads


def assert_compiled_equals_eager(model: DecoderLM, batch: dict, tol: float, **options) -> None:
    loss, logits, grads = train_step(CompiledModel(model, **options), model, batch)
    ref_loss, ref_logits, ref_grads = train_step(model, model, batch)
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("attention, ffn", [("mha", "deepseek"), ("mla", "topk")])
def test_moe_model_traces_as_one_graph_and_equals_eager(attention, ffn):
    """fullgraph=True: no graph break anywhere in the model, padding, routing and capacity
    included; the experts' custom op and its hand-written backward give eager's gradients."""
    model = tiny_lm(attention, ffn)
    assert_compiled_equals_eager(model, inputs(padded=True), 1e-5, backend="aot_eager", fullgraph=True)


def test_z_loss_with_padding_breaks_the_graph_but_equals_eager():
    """torch's logsumexp asks whether its input is empty, which the padding-masked row count
    cannot answer while tracing: dynamo breaks the graph there (see moeformer.compiled)."""
    torch.manual_seed(0)
    model = DecoderLM(preset("lm-tiny", vocab_size=VOCAB, dropout=0.0, moe={**FFNS["topk"], "z_loss": 1e-3})).train()
    assert_compiled_equals_eager(model, inputs(padded=True), 1e-5, backend="aot_eager")


def test_compiled_under_bf16_autocast_is_close_to_eager():
    model = tiny_lm("mha", "deepseek")
    batch = inputs(padded=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_compiled_equals_eager(model, batch, 2e-2, backend="aot_eager", fullgraph=True)


def test_dynamo_settings_do_not_outlive_the_call():
    flag = torch._dynamo.config.capture_dynamic_output_shape_ops
    model = tiny_lm("mha", "topk")
    CompiledModel(model, backend="aot_eager")(**inputs(padded=False))
    assert torch._dynamo.config.capture_dynamic_output_shape_ops == flag


def test_experts_custom_op_passes_opcheck():
    """Schema, fake kernel (data-dependent row count), autograd registration, AOT dispatch."""
    import moeformer.moe.expert_ops  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(0)
    N, D, H, E, K = 12, 16, 8, 4, 2
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w_up = torch.randn(E, 2 * H, D, generator=g, requires_grad=True)
    w_down = torch.randn(E, D, H, generator=g, requires_grad=True)
    index = torch.rand(N, E, generator=g).argsort(-1)[:, :K]
    index[0, 0] = E  # one assignment dropped: V < N * K
    weights = torch.rand(N, K, generator=g, requires_grad=True)
    for kernel in ("loop", "grouped_mm"):
        args = (x, w_up, w_down, index, weights, "swiglu", kernel)
        torch.library.opcheck(torch.ops.moeformer.experts_forward.default, args)


def test_inductor_equals_eager():
    """Inductor's generated kernels: loss, logits and every gradient within float32 tolerance
    (the model the trainer test compiles too, so that its kernels come from the cache)."""
    assert_compiled_equals_eager(tiny_lm("mla", "deepseek"), inputs(padded=False), 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("attention, ffn", [(a, f) for a in ATTENTIONS for f in FFNS if (a, f) != ("mla", "deepseek")])
def test_inductor_equals_eager_matrix(attention, ffn):
    """The other attention x FFN pairs through inductor (about a minute each on a cold cache)."""
    assert_compiled_equals_eager(tiny_lm(attention, ffn), inputs(padded=True), 1e-4)


def copy_task() -> TrainingTask:
    def batches(epoch: int) -> list[Batch]:
        g = torch.Generator().manual_seed(1000 + epoch)
        half = [torch.randint(3, VOCAB, (3, 5), generator=g) for _ in range(3)]
        seqs = [torch.cat([h, h, h[:, :1]], dim=1) for h in half]
        return [Batch({"tokens": s[:, :-1]}, s[:, 1:], n_tokens=s[:, 1:].numel()) for s in seqs]

    return TrainingTask(train_batches=batches, valid_batches=batches(-1), meta={"config": {}}, pad_id=0)


def test_trainer_compile_gives_eager_losses_and_checkpoint(tmp_path):
    runs = {}
    for compile in (False, True):
        config = TrainConfig(steps=3, lr=3e-3, warmup_steps=1, eval_every=3, save_every=3, log_every=1,
                             compile=compile)  # fmt: skip
        trainer = Trainer(tiny_lm("mla", "deepseek"), copy_task(), config, tmp_path / str(compile), progress=False)
        losses = [row["loss"] for row in trainer.train().metrics]
        weights = safetensors.torch.load_file(str(trainer.last_checkpoint / "model.safetensors"))
        runs[compile] = losses, weights
    (losses, weights), (ref_losses, ref_weights) = runs[True], runs[False]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=0)
    assert list(weights) == list(ref_weights)  # no "_orig_mod." prefixes
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], atol=1e-5, rtol=1e-5)


def test_compile_with_expert_parallelism_is_refused():
    with pytest.raises(ConfigError, match="compile.*expert_parallel"):
        TrainConfig(compile=True, expert_parallel=2)
