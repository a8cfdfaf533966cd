"""Decoder-only language model (the "LLM" of the article), built from the same parts.

The encoder-decoder's decoder without cross-attention, with the choices of modern LMs
(GPT-2 / Llama): pre-norm RMSNorm, rotary positions, SwiGLU FFNs, optional grouped-query
attention (``attention.n_kv_heads``) or DeepSeek's multi-head latent attention (``attention.kind =
"mla"``), and a final norm before the output projection.

    h_0 = Embed(tokens);  h_l = Block_l(h_{l-1});  logits = Norm(h_L) W_out

Logits at position t predict token t+1. With a :class:`~moeformer.models.cache.DecoderCache`,
each call feeds only the new tokens and attends to every cached one.
"""

from __future__ import annotations

from torch import Tensor, nn

from moeformer.layers.embedding import TokenEmbedding
from moeformer.layers.norm import build_norm
from moeformer.model_config import ModelConfig
from moeformer.models.blocks import DecoderBlock
from moeformer.models.cache import DecoderCache, step_positions
from moeformer.models.embedder import InputEmbedding
from moeformer.models.ffn_factory import build_ffn
from moeformer.models.init import init_weights
from moeformer.models.inputs import check_length, check_padding_mask, check_tokens
from moeformer.models.outputs import FFNReports, ModelOutput
from moeformer.models.stack import run_blocks


class DecoderLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "decoder":
            raise ValueError(f"DecoderLM needs arch='decoder', got {config.arch!r}; use Seq2SeqTransformer")
        self.config = config
        embed = TokenEmbedding(config.vocab_size, config.d_model, scale=config.scale_embeddings)
        self.embedding = InputEmbedding(config, embed)
        self.layers = nn.ModuleList(
            DecoderBlock(config, build_ffn(config, i, "decoder"), cross_attention=False) for i in range(config.n_layers)
        )
        pre = config.norm_position == "pre"
        self.norm = build_norm(config.norm, config.d_model, config.norm_eps) if pre else nn.Identity()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self)
        if config.tie_embeddings:
            self.lm_head.weight = embed.weight

    def forward(
        self,
        tokens: Tensor,
        *,
        padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        reports: bool = True,
    ) -> ModelOutput:
        """tokens: (B, T) ids -> logits (B, T, V).

        padding_mask: (B, T) bool, True at padding (left or right). With a ``cache``, pass the
        new tokens only; the cache remembers earlier keys, their padding and positions.
        ``reports=False``: MoE layers skip their auxiliary losses and routing statistics (the
        output's ``reports`` stay empty, ``aux_loss`` 0); the decoding functions ask for that.
        """
        check_tokens(tokens, self.config.vocab_size, "tokens")
        check_padding_mask(padding_mask, tokens, "padding_mask")
        past = 0 if cache is None else cache.length
        check_length(past + tokens.shape[1], self.config.max_seq_len, "tokens")
        positions, keys_padding = step_positions(padding_mask, cache, *tokens.shape, tokens.device)
        x, rotary = self.embedding(tokens, positions)
        found = FFNReports()
        x = run_blocks(self.layers, x, "layers", found, cache, padding_mask=keys_padding, rotary=rotary, report=reports)
        x = self.norm(x)
        return ModelOutput(self.lm_head(x), found.total(x), found, x, cache)

    def new_cache(self, capacity: int = 0) -> DecoderCache:
        """An empty cache for incremental decoding.

        ``capacity``: the positions it will hold (prompt + new tokens), if known: keys, values and
        padding are then written in place instead of concatenated at every step (inference only).
        """
        return DecoderCache([block.new_cache(capacity) for block in self.layers], capacity=capacity)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
