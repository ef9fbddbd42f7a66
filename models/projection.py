"""CODI's latent projection: Linear(d, p) -> GELU -> Linear(p, d) -> LayerNorm(d).

Applied to every latent before it is fed back, including the first one taken at ``<bot>``. The
reference has a dropout in front with p=0 in every script; it is left out. ``feedback_args``
hands the tensors to the fused latent-feedback op, which runs this whole epilogue in the rollout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LatentProjection(nn.Module):
    def __init__(self, hidden: int, proj_dim: int = 0, layernorm: bool = True, eps: float = 1e-5):
        super().__init__()
        proj_dim = proj_dim or hidden
        self.fc1 = nn.Linear(hidden, proj_dim)
        self.fc2 = nn.Linear(proj_dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps) if layernorm else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.fc2(F.gelu(self.fc1(h)))
        return self.norm(h) if self.norm is not None else h

    def feedback_args(self) -> dict:
        norm = (self.norm.weight, self.norm.bias, self.norm.eps) if self.norm is not None else None
        return {"proj": (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias), "norm": norm}
