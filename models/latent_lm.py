"""The module that is trained: a Hugging Face causal LM plus a method's extra parts.

``LatentLM.forward(fn, *args)`` runs ``fn(self, *args)``: every objective executes *inside* the
module's forward, so an engine that wraps this module (DeepSpeed ZeRO-3 gathers parameters in
forward hooks) sees one forward call per micro-batch, whatever the objective does inside it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class LatentLM(nn.Module):
    def __init__(self, lm: nn.Module, projection: nn.Module | None = None, step_decoder: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.projection = projection  # CODI: hidden state -> next input embedding
        self.step_decoder = step_decoder  # SIM-CoT: latent -> its reasoning step (training only)

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self, *args, **kwargs)

    @property
    def config(self):
        return self.lm.config

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def extras_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters outside the HF model (saved beside it in checkpoints)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}
