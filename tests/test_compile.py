"""torch.compile for training: an MoE model traces as one graph, compiled equals eager (loss,
logits, every gradient), and ``train.compile`` trains and saves like eager.

CPU compilation is slow (inductor writes and builds C++ kernels: about a minute per model on a
cold cache here), so the fast checks use the ``aot_eager`` backend: dynamo and AOTAutograd (graph
capture, the experts' custom ops and their fake kernels, the joint forward-backward graph) without
code generation, and inductor only in the trainer test; the attention x FFN matrix through
inductor, bf16 autocast and the known graph break are marked slow.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch._dynamo.utils import counters

from moeformer import DecoderLM, preset
from moeformer.compiled import CompiledModel
from moeformer.train.config import TrainConfig
from moeformer.train.loss import smoothed_cross_entropy
from moeformer.train.trainer import Batch, Trainer, TrainingTask
from moeformer.validation import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles afresh: dynamo keeps at most 8 graphs per function and then runs it
    eagerly without a word, which would make later tests compare eager with eager."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


VOCAB = 37
FFNS = {
    "dense": None,
    "topk": {"kind": "topk", "n_experts": 4, "top_k": 2, "balance_loss": 0.01, "capacity_factor": 1.25,
             "z_loss": 1e-3},
    "deepseek": {"kind": "deepseek", "n_experts": 8, "top_k": 2, "n_shared": 1, "score": "sigmoid",
                 "bias_update_rate": 1e-3, "balance_loss": 0.01, "seq_balance_loss": 1e-3},
}  # fmt: skip
ATTENTIONS = {"mha": "lm-tiny", "mla": "lm-tiny-mla"}


def tiny_lm(attention: str, ffn: str, **overrides) -> DecoderLM:
    """A tiny decoder LM in training mode, without dropout (compiled dropout draws other masks)."""
    torch.manual_seed(0)
    overrides = {"moe": FFNS[ffn], **overrides} if FFNS[ffn] else overrides
    return DecoderLM(preset(ATTENTIONS[attention], vocab_size=VOCAB, dropout=0.0, **overrides)).train()


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
    assert graphs_compiled() > 0
    ref_loss, ref_logits, ref_grads = train_step(model, model, batch)
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_moe_model_traces_as_one_graph_and_equals_eager():
    """fullgraph=True: no graph break anywhere in an MLA + DeepSeekMoE model, padding, routing,
    capacity and every auxiliary loss included; the experts' custom op and its hand-written
    backward give eager's gradients."""
    flag = torch._dynamo.config.capture_dynamic_output_shape_ops
    model = tiny_lm("mla", "deepseek", moe={**FFNS["deepseek"], "capacity_factor": 1.25, "z_loss": 1e-3})
    assert_compiled_equals_eager(model, inputs(padded=True), 1e-5, backend="aot_eager", fullgraph=True)
    assert torch._dynamo.config.capture_dynamic_output_shape_ops == flag  # set for the call only


def test_experts_on_the_bmm_kernel_run_eagerly_inside_a_compiled_model():
    """The composed path (padded bmm, or expert biases) reads counts on the host: the graph breaks
    there, that part runs eagerly, the rest compiles, and losses, logits and gradients are eager's."""
    model = tiny_lm("mha", "topk", moe={**FFNS["topk"], "backend": "bmm"})
    assert_compiled_equals_eager(model, inputs(padded=True), 1e-5, backend="aot_eager")
    assert graphs_compiled() >= 2  # the graph is cut at the experts, once per MoE layer at least


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


@pytest.mark.slow
@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("ffn", list(FFNS))
def test_every_model_traces_as_one_graph_and_equals_eager(ffn, attention):
    """dense, top-k and DeepSeekMoE FFNs x MHA and MLA, with padding, fullgraph=True."""
    model = tiny_lm(attention, ffn)
    assert_compiled_equals_eager(model, inputs(padded=True), 1e-5, backend="aot_eager", fullgraph=True)


@pytest.mark.slow
@pytest.mark.parametrize("ffn", ["dense", "topk"])
def test_inductor_equals_eager(ffn):
    """Inductor's generated kernels, with padding (and top-k's capacity): loss, logits and every
    gradient within float32 tolerance. MLA + DeepSeekMoE go through inductor in the trainer test;
    each model takes about a minute to compile on a cold cache, hence two more here."""
    assert_compiled_equals_eager(tiny_lm("mha", ffn), inputs(padded=True), 1e-4)


def relative_error(run: tuple, ref: tuple) -> tuple[float, float]:
    """(logits, all gradients as one vector): |run - ref| / |ref|."""
    grads = torch.cat([(run[2][n] - ref[2][n]).flatten() for n in ref[2]])
    scale = torch.cat([g.flatten() for g in ref[2].values()])
    return float((run[1] - ref[1]).norm() / ref[1].norm()), float(grads.norm() / scale.norm())


@pytest.mark.slow
def test_inductor_under_bf16_autocast_is_as_accurate_as_eager():
    """bf16 rounds differently compiled (inductor keeps float32 inside fused kernels) and eager, so
    both are compared with float32: the compiled step's error is at most about eager's."""
    model = tiny_lm("mha", "deepseek")
    batch = inputs(padded=False)
    ref = train_step(model, model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = train_step(CompiledModel(model), model, batch)
        eager = train_step(model, model, batch)
    assert compiled[1].dtype == torch.bfloat16
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-2, rtol=0)
    for error, eager_error in zip(relative_error(compiled, ref), relative_error(eager, ref)):
        assert error <= 2 * eager_error + 1e-2


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
        assert graphs_compiled() == (1 if compile else 0)  # one graph: no break, no recompile
    (losses, weights), (ref_losses, ref_weights) = runs[True], runs[False]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=0)
    assert list(weights) == list(ref_weights)  # no "_orig_mod." prefixes
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], atol=1e-5, rtol=1e-5)


def test_compile_with_expert_parallelism_is_refused():
    with pytest.raises(ConfigError, match="compile.*expert_parallel"):
        TrainConfig(compile=True, expert_parallel=2)
