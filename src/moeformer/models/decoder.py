"""Decoder-only language model (the "LLM" of the article), built from the same parts.

The encoder-decoder's decoder without cross-attention, with the choices of modern LMs
(GPT-2 / Llama): pre-norm RMSNorm, rotary positions, SwiGLU FFNs, optional grouped-query
attention (``attention.n_kv_heads``) or DeepSeek's multi-head latent attention (``attention.kind =
"mla"``), and a final norm before the output projection.

    h_0 = Embed(tokens);  h_l = Block_l(h_{l-1});  logits = Norm(h_L) W_out

Logits at position t predict token t+1. With a :class:`~moeformer.models.cache.DecoderCache`,
each call feeds only the new tokens and attends to every cached one. With ``[model.mtp]``, modules
of DeepSeek-V3's multi-token prediction (:mod:`moeformer.models.mtp`) follow the stack and, when
asked (``mtp=True``: training), also predict tokens t+2 ... t+D+1.
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
from moeformer.models.mtp import MTPModule, MTPOutput
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
        depth = 0 if config.mtp is None else config.mtp.depth
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(1, depth + 1))
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
        mtp: bool = False,
    ) -> ModelOutput:
        """tokens: (B, T) ids -> logits (B, T, V).

        padding_mask: (B, T) bool, True at padding (left or right). With a ``cache``, pass the
        new tokens only; the cache remembers earlier keys, their padding and positions.
        ``reports=False``: MoE layers skip their auxiliary losses and routing statistics (the
        output's ``reports`` stay empty, ``aux_loss`` 0); the decoding functions ask for that.
        ``mtp=True`` (a model with ``[model.mtp]``, no cache): ``mtp_logits`` gets one
        (B, T - k, V) tensor per depth k, position i predicting token t_{i+k+1}; their MoE
        losses join ``aux_loss`` under "mtp.{k-1}".
        """
        check_tokens(tokens, self.config.vocab_size, "tokens")
        check_padding_mask(padding_mask, tokens, "padding_mask")
        needed = tokens.shape[1] if cache is None else cache.positions_after(padding_mask, tokens.shape[1])
        check_length(needed, self.config.max_seq_len, "tokens")
        if mtp and cache is not None:
            raise ValueError("mtp=True runs the MTP modules over a whole window; it takes no cache")
        positions, keys_padding = step_positions(padding_mask, cache, *tokens.shape, tokens.device)
        x, rotary = self.embedding(tokens, positions)
        found = FFNReports()
        h = run_blocks(self.layers, x, "layers", found, cache, padding_mask=keys_padding, rotary=rotary, report=reports)
        x = self.norm(h)
        logits = self.lm_head(x)
        ahead = self._predict_ahead(tokens, h, keys_padding, rotary, found, reports) if mtp else []
        return ModelOutput(logits, found.total(x), found, x, cache, residual=h, mtp_logits=ahead)

    def _predict_ahead(
        self,
        tokens: Tensor,
        hidden: Tensor,
        padding: Tensor | None,
        rotary: tuple[Tensor, Tensor] | None,
        found: FFNReports,
        report: bool,
    ) -> list[Tensor]:
        """Logits of every MTP depth over the whole window (training; no cache).

        Depth k runs on the first T - k positions: position i reads h^{k-1}_i and Emb(t_{i+k}).
        """
        if not len(self.mtp):
            raise ValueError("mtp=True needs a model built with [model.mtp]; this one has no MTP modules")
        T, out = tokens.shape[1], []
        if T <= len(self.mtp):
            raise ValueError(f"MTP depth {len(self.mtp)} needs more than {len(self.mtp)} tokens per row, got {T}")
        for k, module in enumerate(self.mtp, start=1):
            n = T - k
            result = module(
                hidden[:, :n],
                self.embedding.embed(tokens[:, k:]),
                self.lm_head,
                padding_mask=None if padding is None else padding[:, :n],
                rotary=None if rotary is None else (rotary[0][:, :, :n], rotary[1][:, :, :n]),
                report=report,
            )
            found.add(f"mtp.{k - 1}", result.block)
            hidden = result.hidden
            out.append(result.logits)
        return out

    def mtp_step(
        self,
        hidden: Tensor,
        next_tokens: Tensor,
        *,
        cache: DecoderCache,
        padding_mask: Tensor | None = None,
        depth: int = 1,
    ) -> MTPOutput:
        """MTP module ``depth`` (1 ... D) incrementally: the drafters of speculative decoding.

        hidden: (B, T, D) h^{depth-1} at T new positions (the main model's ``residual`` for depth
        1, the previous module's ``hidden`` after); next_tokens: (B, T) the token ``depth``
        positions after each of them -> logits (B, T, V) for the token after that. ``cache``: from
        :meth:`new_mtp_cache` for the same depth; padding_mask (B, T): slots to ignore, as in
        :meth:`forward`.
        """
        if not 1 <= depth <= len(self.mtp):
            have = f"depths 1 to {len(self.mtp)}" if len(self.mtp) else "no MTP module: train it with [model.mtp]"
            raise ValueError(f"MTP depth {depth} asked for; this model has {have}")
        positions, keys_padding = step_positions(padding_mask, cache, *next_tokens.shape, next_tokens.device)
        return self.mtp[depth - 1](
            hidden,
            self.embedding.embed(next_tokens),
            self.lm_head,
            padding_mask=keys_padding,
            rotary=self.embedding.angles(positions, hidden.dtype),
            cache=cache.layers[0],
            report=False,
        )

    def new_mtp_cache(self, capacity: int = 0, depth: int = 1) -> DecoderCache:
        """An empty cache for :meth:`mtp_step` at ``depth`` (``capacity`` as in :meth:`new_cache`)."""
        return DecoderCache([self.mtp[depth - 1].new_cache(capacity)], capacity=capacity)

    def new_cache(self, capacity: int = 0) -> DecoderCache:
        """An empty cache for incremental decoding.

        ``capacity``: the positions it will hold (prompt + new tokens), if known: keys, values and
        padding are then written in place instead of concatenated at every step (inference only).
        """
        return DecoderCache([block.new_cache(capacity) for block in self.layers], capacity=capacity)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
