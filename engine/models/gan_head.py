"""The classifier head of DMD2's GAN term: a small network on the critic's intermediate features.

DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis", Sec. 4.3) puts a
classifier on the fake score network's features and trains it to tell noised real data from noised generator
samples; Self-Forcing's `model/gan.py` does the same for video with one learned query per tapped layer that
attends over that layer's tokens. This head follows that shape:

    features[k] (B, L, D) --LayerNorm--> attention pooling with learned query q_k --> token (B, D)
    tokens (B, K * D) --LayerNorm, Linear, SiLU, Linear--> logit (B,)

A whole clip gets one logit (real vs generated), so the head sees every frame and every position at once.
The head holds no loss; `engine.training.losses.GANGeneratorLoss` / `GANCriticLoss` use its logits.
"""

from __future__ import annotations

import torch
from torch import nn


class GANHead(nn.Module):
    """logit (B,) from K feature maps (B, L, D) of the critic.

    dim: the critic's width D. num_features: K, how many layers are tapped. hidden: the MLP's width.
    num_heads: attention heads of the pooling (must divide dim).
    """

    def __init__(self, dim: int, num_features: int, hidden: int, num_heads: int = 1):
        super().__init__()
        if num_features < 1 or hidden < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"GANHead needs num_features, hidden, num_heads >= 1 and num_heads dividing dim; got "
                             f"dim={dim}, num_features={num_features}, hidden={hidden}, num_heads={num_heads}")
        self.dim, self.num_features = dim, num_features
        # small init: the pooled tokens start near the plain (softmax-uniform) mean of each layer's tokens
        self.queries = nn.Parameter(torch.randn(num_features, dim) * 0.02)  # (K, D)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_features))
        self.pools = nn.ModuleList(nn.MultiheadAttention(dim, num_heads, batch_first=True)
                                   for _ in range(num_features))
        self.mlp = nn.Sequential(nn.LayerNorm(num_features * dim), nn.Linear(num_features * dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != self.num_features:
            raise ValueError(f"GANHead was built for {self.num_features} feature maps, got {len(features)}")
        tokens = []
        for k, f in enumerate(features):
            if f.ndim != 3 or f.shape[-1] != self.dim:
                raise ValueError(f"feature map {k} has shape {tuple(f.shape)}, expected (B, L, {self.dim})")
            f = self.norms[k](f.float())  # (B, L, D); the head runs in float32 whatever the critic's dtype
            q = self.queries[k].expand(f.shape[0], 1, -1)  # (B, 1, D)
            pooled, _ = self.pools[k](q, f, f, need_weights=False)  # (B, 1, D)
            tokens.append(pooled[:, 0])
        return self.mlp(torch.cat(tokens, dim=-1))[:, 0]  # (B,)
