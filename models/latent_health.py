"""Latent-health metrics: the signals of the collapse SIM-CoT describes.

When continuous thoughts collapse, a sample's latents become near copies of each other (high
within-sample cosine, effective rank near 1) and the same slot looks alike across samples (high
across-sample cosine): the latents stop carrying problem-specific information.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli, 2007); 1 for a rank-1 matrix."""
    s = torch.linalg.svdvals(x.double())
    s = s[s > 1e-12 * s.max().clamp(min=1e-300)]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def latent_health(latents: torch.Tensor, thinking: torch.Tensor) -> dict[str, float]:
    """Means over a batch of latents (B, L, H) with validity mask (B, L)."""
    if latents.shape[1] == 0 or not bool(thinking.any()):
        return {}
    x = latents.float()
    valid = thinking.bool()
    xn = F.normalize(x, dim=-1)
    out = {"latent_norm": float(x.norm(dim=-1)[valid].mean())}

    sim = xn @ xn.transpose(1, 2)
    upper = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
    pairs = valid[:, :, None] & valid[:, None, :] & upper
    n_pairs = pairs.sum((1, 2))
    has = n_pairs > 0
    if bool(has.any()):
        out["latent_cos_within"] = float(((sim * pairs).sum((1, 2))[has] / n_pairs[has]).mean())

    across = []
    for s in range(x.shape[1]):
        v = xn[valid[:, s], s]
        n = v.shape[0]
        if n >= 2:
            across.append(float(((v @ v.T).sum() - n) / (n * (n - 1))))
    if across:
        out["latent_cos_across"] = sum(across) / len(across)

    ranks = [effective_rank(x[i][valid[i]]) for i in range(x.shape[0]) if int(valid[i].sum()) > 0]
    out["latent_effective_rank"] = sum(ranks) / len(ranks)
    return out
