"""Multi-token prediction (DeepSeek-V3 technical report, section 2.2, Figure 3).

After the main model, D sequential modules each predict one token further ahead. Module k takes
the previous depth's representation h^{k-1}_i (the main model's last hidden state, before its
final norm, for k = 1) and the embedding of token t_{i+k}, and predicts t_{i+k+1}:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]        (report eq. 21)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                (eq. 22)
    P^k_{i+k+1} = OutHead(h^k_i)                                     (eq. 23)

Emb and OutHead are the main model's (shared, not copied); each module owns its two norms, the
projection M_k (D x 2D) and one Transformer block of the model's own kind (MHA or MLA, dense FFN or
MoE), and the norm OutHead applies first. The report writes the concatenation as [h; Emb]; its
released checkpoints (and vLLM and Megatron, which read them) put the embedding first, and so do
we, so that ``eh_proj`` loads as it is stored. The causal chain is kept at every depth: module k at
position i sees tokens t_{<= i+k} only.

Training loss (eq. 24-25): L_MTP = lambda / D * sum_k CE(P^k, t shifted by k + 1), averaged over the
positions each depth has (T - k); :func:`moeformer.train.loss.mtp_losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moeformer.layers.norm import build_norm
from moeformer.model_config import ModelConfig
from moeformer.models.blocks import BlockOutput, DecoderBlock, LayerCache
from moeformer.models.ffn_factory import build_ffn


@dataclass
class MTPOutput:
    hidden: Tensor  # (B, T', D) h^k before the head's norm: what depth k + 1 reads
    logits: Tensor  # (B, T', V) position i predicts t_{i+k+1}
    block: BlockOutput  # the block's FFN reports (MoE losses and statistics)


class MTPModule(nn.Module):
    """One depth k of multi-token prediction. Weight names follow DeepSeek-V3's layer
    ``num_hidden_layers`` (enorm, hnorm, eh_proj, the block, shared_head.norm -> ``norm``)."""

    def __init__(self, config: ModelConfig, depth: int) -> None:
        super().__init__()
        D = config.d_model
        self.enorm = build_norm("rmsnorm", D, config.norm_eps)
        self.hnorm = build_norm("rmsnorm", D, config.norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        # its FFN is built as layer n_layers + depth - 1 would be: MoE wherever the stack's last layers are
        ffn = build_ffn(config, config.n_layers + depth - 1, "decoder")
        self.block = DecoderBlock(config, ffn, cross_attention=False)
        self.norm = build_norm(config.norm, D, config.norm_eps)

    def forward(
        self,
        hidden: Tensor,
        next_embedding: Tensor,
        head: nn.Module,
        *,
        padding_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
        report: bool = True,
    ) -> MTPOutput:
        """hidden: (B, T', D) h^{k-1}; next_embedding: (B, T', D) Emb(t_{i+k}) at each position i.

        padding_mask: (B, S) over cached + new positions (as :class:`DecoderBlock`); rotary: the
        angles of the T' positions; ``head``: the main model's output projection.
        """
        x = self.eh_proj(torch.cat([self.enorm(next_embedding), self.hnorm(hidden)], dim=-1))
        out = self.block(x, padding_mask=padding_mask, cache=cache, rotary=rotary, report=report)
        return MTPOutput(out.hidden, head(self.norm(out.hidden)), out)

    def new_cache(self, capacity: int = 0) -> LayerCache:
        return self.block.new_cache(capacity)
