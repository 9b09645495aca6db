"""Fusion of a text sequence and an image sequence into one vector per pair.

Both modules take sequences already projected to `dim` and return [B, dim]; the
classifier's task heads and the ITM head read that vector.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.encoders import masked_mean


class CrossAttentionLayer(nn.Module):
    """Pre-norm block: text queries attend over image tokens, then a feed-forward."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, text: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        kv = self.norm_kv(image)
        attended, _ = self.attn(self.norm_q(text), kv, kv, key_padding_mask=~image_mask, need_weights=False)
        text = text + self.drop(attended)
        return text + self.drop(self.ff(self.norm_ff(text)))


class CrossAttentionFusion(nn.Module):
    """Text tokens query the image tokens; the fused vector pools the updated text tokens."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        for layer in self.layers:
            text = layer(text, image, image_mask)
        return self.norm(masked_mean(text, text_mask))


class ConcatFusion(nn.Module):
    """[t, i, t*i, |t-i|] of the pooled sequences through an MLP (the paper's simple baseline)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * dim, dim), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(dim))

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        import torch

        t = masked_mean(text, text_mask)
        i = masked_mean(image, image_mask)
        return self.mlp(torch.cat([t, i, t * i, (t - i).abs()], dim=-1))
