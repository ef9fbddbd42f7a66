"""The tanh-approximate GELU of evaluation forwards on the CPU: the same function, a third of the time.

transformers' tanh GELUs (`gelu_new`: GPT-2, GPT-J, Phi-1/2; `gelu_fast`; `gelu_pytorch_tanh`:
Gemma, StarCoder2) compute 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). On the CPU
torch's tanh is the expensive part (several times a sigmoid), and `gelu_new` adds seven more
elementwise passes: with them a batch-256 tiny GPT-2 evaluation spent 36 % of its time outside
matrix multiplies, with this about a quarter (benchmarks/README.md, rollout). Since 1 + tanh(u) =
2 sigmoid(2u), the same function is x sigmoid(2u) = x sigmoid(x (c1 + c3 x^2)): one sigmoid and
four cheap passes. It is no less accurate: 1 + tanh(u) cancels for u << 0, where the sigmoid
keeps its relative precision.

`cpu_tanh_gelu(lm, device)` puts it in place of a model's tanh-GELU modules for the duration of
an evaluation forward (prefill, latent steps, decoding) on the CPU, for fp32/fp64 models not
partitioned by ZeRO-3 (whose hooks trace the module tree). Training and other devices keep the
model's own modules: on a GPU the elementwise passes are memory-bound kernels either way.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from transformers import activations

from simcot.parallel import is_partitioned

C1 = 2 * math.sqrt(2.0 / math.pi)  # 2u = x (C1 + C3 x^2)
C3 = C1 * 0.044715
# exact types (a subclass may differ); by name, as transformers versions have them (GELUTanh was
# PytorchGELUTanh before, now its alias)
TANH_GELUS = tuple({c: None for c in (getattr(activations, n, None) for n in (
    "NewGELUActivation", "FastGELUActivation", "GELUTanh", "PytorchGELUTanh")) if c is not None})


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed as x sigmoid(x (C1 + C3 x^2))."""
    if torch.is_grad_enabled() and x.requires_grad:  # the same ops in the same order, out of place
        return x * torch.sigmoid((x * x * C3 + C1) * x)
    z = x * x  # a fresh tensor: the input is left as it is
    z.mul_(C3).add_(C1).mul_(x)  # 2u
    return z.sigmoid_().mul_(x)


class TanhGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh_gelu(x)


TANH_GELU = TanhGELU()  # one stateless instance: a compiled step sees the same module every call


def _tanh_gelus(lm: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of each of `lm`'s tanh-GELU modules: looked up once per model (a walk
    of every module) and kept on it, looked up again when one of them was replaced."""
    found = lm.__dict__.get("_simcot_tanh_gelus")
    if found is None or any(parent._modules.get(name) not in (child, TANH_GELU) for parent, name, child in found):
        found = [(parent, name, child) for parent in lm.modules() for name, child in parent.named_children()
                 if type(child) in TANH_GELUS]
        lm.__dict__["_simcot_tanh_gelus"] = found
    return found


@contextlib.contextmanager
def cpu_tanh_gelu(lm: nn.Module, device: torch.device):
    """Inside the block, `lm`'s tanh-GELU modules (`TANH_GELUS`) are `TANH_GELU` when `device` is
    the CPU and `lm` an fp32/fp64 model not under ZeRO-3; its own modules again after. Inside an
    enclosing block (modules already swapped) it does nothing."""
    weight = next(lm.parameters(), None)
    use = (device.type == "cpu" and weight is not None and weight.dtype in (torch.float32, torch.float64)
           and not is_partitioned(weight))  # ZeRO-3 manages every parameter: one says it
    swaps = [(parent, name, child) for parent, name, child in _tanh_gelus(lm)
             if parent._modules.get(name) is child] if use else []
    for parent, name, _ in swaps:
        setattr(parent, name, TANH_GELU)
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
