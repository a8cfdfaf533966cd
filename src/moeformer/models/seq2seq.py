"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017).

References: the paper, sections 3.1-3.5 and Table 3 (base: d_model 512, 8 heads, 6+6 layers,
d_ff 2048, dropout 0.1); the source article, sections 1.1-2.2 (English -> Chinese:
"Are you OK ?" -> "你好吗？").

    memory = Encoder(Embed(src) + PE)                  N x [self-attention, FFN]
    logits = Decoder(Embed(tgt) + PE, memory) W_out    N x [masked self-attn, cross-attn, FFN]

``tgt`` is the target shifted right (starting with BOS); logits at position t predict tgt[t+1].
"""

from __future__ import annotations

from torch import Tensor, nn

from moeformer.layers.embedding import TokenEmbedding
from moeformer.layers.norm import build_norm
from moeformer.model_config import ModelConfig
from moeformer.models.blocks import DecoderBlock, EncoderBlock
from moeformer.models.cache import DecoderCache, step_positions
from moeformer.models.embedder import InputEmbedding
from moeformer.models.ffn_factory import build_ffn
from moeformer.models.init import init_weights
from moeformer.models.inputs import check_length, check_padding_mask, check_tokens
from moeformer.models.outputs import EncoderOutput, FFNReports, ModelOutput
from moeformer.models.stack import run_blocks


class Seq2SeqTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "seq2seq":
            raise ValueError(f"Seq2SeqTransformer needs arch='seq2seq', got {config.arch!r}; use DecoderLM")
        self.config = config
        d = config.d_model
        tgt_embed = TokenEmbedding(config.vocab_size, d, scale=config.scale_embeddings)
        src_embed = (
            tgt_embed
            if config.share_embeddings
            else TokenEmbedding(config.source_vocab_size, d, scale=config.scale_embeddings)
        )
        self.src_embedding = InputEmbedding(config, src_embed)
        self.tgt_embedding = InputEmbedding(config, tgt_embed)
        self.encoder = nn.ModuleList(
            EncoderBlock(config, build_ffn(config, i, "encoder")) for i in range(config.encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderBlock(config, build_ffn(config, i, "decoder"), cross_attention=True) for i in range(config.n_layers)
        )
        # Pre-norm stacks end un-normalised, so they get a final norm; post-norm ones do not.
        pre = config.norm_position == "pre"
        self.encoder_norm = build_norm(config.norm, d, config.norm_eps) if pre else nn.Identity()
        self.decoder_norm = build_norm(config.norm, d, config.norm_eps) if pre else nn.Identity()
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        init_weights(self)
        if config.tie_embeddings:
            self.lm_head.weight = tgt_embed.weight

    def encode(self, src: Tensor, *, src_padding_mask: Tensor | None = None) -> EncoderOutput:
        """src: (B, S) ids; src_padding_mask: (B, S) bool, True at padding."""
        check_tokens(src, self.config.source_vocab_size, "src")
        check_padding_mask(src_padding_mask, src, "src_padding_mask")
        check_length(src.shape[1], self.config.max_seq_len, "src")
        positions, _ = step_positions(src_padding_mask, None, *src.shape, src.device)
        x, _ = self.src_embedding(src, positions)
        reports = FFNReports()
        x = run_blocks(self.encoder, x, "encoder", reports, padding_mask=src_padding_mask)
        return EncoderOutput(self.encoder_norm(x), src_padding_mask, reports)

    def decode(
        self,
        tgt: Tensor,
        memory: EncoderOutput,
        *,
        tgt_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> ModelOutput:
        """tgt: (B, T) ids (the new ones only when a ``cache`` is given) -> logits (B, T, V)."""
        check_tokens(tgt, self.config.vocab_size, "tgt")
        check_padding_mask(tgt_padding_mask, tgt, "tgt_padding_mask")
        if memory.hidden.shape[0] != tgt.shape[0]:
            raise ValueError(f"memory has batch {memory.hidden.shape[0]} but tgt has batch {tgt.shape[0]}")
        past = 0 if cache is None else cache.length
        check_length(past + tgt.shape[1], self.config.max_seq_len, "tgt")
        positions, keys_padding = step_positions(tgt_padding_mask, cache, *tgt.shape, tgt.device)
        x, rotary = self.tgt_embedding(tgt, positions)
        reports = FFNReports()
        reports.merge(memory.reports)  # encoder layers first
        x = run_blocks(
            self.decoder,
            x,
            "decoder",
            reports,
            cache,
            padding_mask=keys_padding,
            memory=memory.hidden,
            memory_padding_mask=memory.padding_mask,
            rotary=rotary,
        )
        x = self.decoder_norm(x)
        return ModelOutput(self.lm_head(x), reports.total(x), reports, x, cache)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
    ) -> ModelOutput:
        """Teacher-forced training pass: src (B, S), tgt (B, T) -> logits (B, T, V)."""
        memory = self.encode(src, src_padding_mask=src_padding_mask)
        return self.decode(tgt, memory, tgt_padding_mask=tgt_padding_mask)

    def new_cache(self) -> DecoderCache:
        """An empty cache for incremental decoding with :meth:`decode`."""
        return DecoderCache([block.new_cache() for block in self.decoder])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts tied ones once
