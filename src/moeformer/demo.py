"""``moeformer demo``: the article's running example, end to end, in seconds on a CPU.

Builds a small encoder-decoder Transformer with DeepSeekMoE feed-forward layers, translates
"Are you OK?" before training (noise), overfits a dozen English -> Chinese pairs in the spirit of the article's example
("Are you OK ?" -> "你好吗？"), then translates again with greedy decoding over the KV cache.
It shows the pieces working together; real training on real corpora is ``moeformer train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from moeformer.data.char_tokenizer import CharTokenizer
from moeformer.decode.greedy import greedy_translate
from moeformer.models.seq2seq import Seq2SeqTransformer
from moeformer.presets import preset

PAIRS = [
    ("Are you OK?", "你好吗？"),
    ("I am fine.", "我很好。"),
    ("Thank you.", "谢谢你。"),
    ("Good morning.", "早上好。"),
    ("I love you.", "我爱你。"),
    ("Where are you?", "你在哪里？"),
    ("I am a student.", "我是学生。"),
    ("The river is too wide.", "这条河太宽了。"),
    ("It is too tired.", "它太累了。"),
    ("See you tomorrow.", "明天见。"),
    ("What is your name?", "你叫什么名字？"),
    ("I like tea.", "我喜欢茶。"),
]


@dataclass
class DemoReport:
    parameters: int
    config_summary: str
    before: list[tuple[str, str]]  # (source, translation) of the untrained model
    after: list[tuple[str, str]]
    losses: list[float] = field(default_factory=list)
    expert_load: dict[str, list[float]] = field(default_factory=dict)  # last step, by layer


def _batch(tok: CharTokenizer, texts: list[str], *, bos: bool, eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tok.encode(t, bos=bos, eos=eos) for t in texts]
    width = max(len(i) for i in ids)
    out = torch.full((len(ids), width), tok.pad_id, dtype=torch.long)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = torch.tensor(seq)
    return out, out == tok.pad_id


def _translate(model: Seq2SeqTransformer, tok: CharTokenizer, texts: list[str]) -> list[tuple[str, str]]:
    model.eval()
    src, src_pad = _batch(tok, texts, bos=False, eos=True)
    ids = greedy_translate(model, src, src_padding_mask=src_pad, bos_id=tok.bos_id, eos_id=tok.eos_id, max_len=16)
    return [(t, tok.decode(row.tolist())) for t, row in zip(texts, ids)]


def run_demo(*, steps: int = 300, seed: int = 0, progress: bool = True) -> DemoReport:
    """Train the small model for ``steps`` full-batch Adam steps; returns what to show."""
    torch.manual_seed(seed)
    tok = CharTokenizer.train(s for pair in PAIRS for s in pair)
    config = preset(
        "transformer-tiny",
        vocab_size=tok.vocab_size,
        d_model=64,
        share_embeddings=True,
        attention={"n_heads": 4},
        ffn={"d_ff": 128, "activation": "swiglu", "bias": False},
        # DeepSeekMoE: 2 coarse experts of 128, top-1, split 4 ways, one shared expert
        moe={"kind": "deepseek", "n_experts": 7, "top_k": 3, "expert_hidden": 32, "n_shared": 1, "balance_loss": 0.01},
    )
    model = Seq2SeqTransformer(config)
    shown = [PAIRS[0][0], PAIRS[7][0], PAIRS[8][0]]
    report = DemoReport(
        parameters=model.num_parameters(),
        config_summary=(
            f"d_model={config.d_model} heads={config.attention.n_heads} layers={config.encoder_layers}+"
            f"{config.n_layers} vocab={config.vocab_size} ({config.norm_position}-norm); FFNs: DeepSeekMoE, "
            f"{config.moe.n_shared} shared + {config.moe.n_experts} routed experts of {config.moe.expert_hidden}, "
            f"top-{config.moe.top_k}"
        ),
        before=_translate(model, tok, shown),
        after=[],
    )
    src, src_pad = _batch(tok, [p[0] for p in PAIRS], bos=False, eos=True)
    tgt, tgt_pad = _batch(tok, [p[1] for p in PAIRS], bos=True, eos=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in tqdm(range(steps), desc="training on the demo pairs", disable=not progress):
        out = model(src, tgt[:, :-1], src_padding_mask=src_pad, tgt_padding_mask=tgt_pad[:, :-1])
        loss = F.cross_entropy(out.logits.transpose(1, 2), tgt[:, 1:], ignore_index=tok.pad_id)
        loss = loss + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report.losses.append(loss.item())
        report.expert_load = {k: v["tokens_per_expert"].tolist() for k, v in out.reports.stats.items()}
    report.after = _translate(model, tok, shown)
    return report
