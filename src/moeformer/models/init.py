"""Weight initialisation shared by the models.

Linear layers: Xavier-uniform with zero biases (the choice of the paper's tensor2tensor code and
of the Annotated Transformer); embeddings: N(0, 1/d_model), so that after the sqrt(d_model)
scaling each coordinate has unit variance, like the sinusoidal signal it is added to.
"""

from __future__ import annotations

from torch import nn

from moeformer.layers.embedding import TokenEmbedding


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    # Embeddings last: a tied output projection shares their matrix and must not overwrite it.
    for m in module.modules():
        if isinstance(m, TokenEmbedding):
            nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)
