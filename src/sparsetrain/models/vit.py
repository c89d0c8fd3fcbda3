"""Vision Transformer for 32x32 images (Dosovitskiy et al., "An Image is Worth 16x16 Words",
ICLR 2021), with patch 4: 64 patch tokens plus a class token.

Pre-norm blocks: x + proj(attention(LN(x))), then x + fc2(GELU(fc1(LN(x)))); the head reads the
final LN of the class token. ``vit-tiny`` has DeiT-Tiny's shape (width 192, depth 12, 3 heads, MLP
768; Touvron et al. 2021), 5.36 M parameters here; ``vit-micro`` (width 64, depth 4, 2 heads) is
for quick runs and tests. Init: truncated normal (std 0.02) for Linear weights and the embeddings,
zero biases.

Prunable by default (``default_exclude``): the Linear layers of attention and MLP. The patch
embedding and the classifier head are excluded unless a method is given its own ``exclude``
(``exclude=[]`` prunes them too); norms and embeddings have no prunable weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrain.models.layers import check_positive_int
from sparsetrain.models.registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention with one qkv Linear and an output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not a multiple of heads={heads}; allowed: dim divisible by heads.")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch embedding (a stride-``patch`` convolution), class token, learned positions, blocks, head."""

    default_exclude = ("patch_embed", "fc")

    def __init__(self, num_classes: int = 10, dim: int = 192, depth: int = 12, heads: int = 3, mlp_dim: int = 768,
                 patch: int = 4, image_size: int = 32) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("dim", dim), ("depth", depth), ("heads", heads),
                            ("mlp_dim", mlp_dim), ("patch", patch), ("image_size", image_size)):
            check_positive_int(name, value)
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not a multiple of patch={patch}; allowed: a multiple.")
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.fc(self.norm(self.blocks(tokens))[:, 0])


@register_model("vit-tiny")
def vit_tiny(num_classes: int = 10, dim: int = 192, depth: int = 12, heads: int = 3, mlp_dim: int = 768) -> ViT:
    """ViT-Tiny for 32x32 images, patch 4 (about 5.4 M parameters)."""
    return ViT(num_classes, dim, depth, heads, mlp_dim)


@register_model("vit-micro")
def vit_micro(num_classes: int = 10, dim: int = 64, depth: int = 4, heads: int = 2, mlp_dim: int = 128) -> ViT:
    """A small ViT for 32x32 images, patch 4, for quick runs and tests."""
    return ViT(num_classes, dim, depth, heads, mlp_dim)
