"""Which implementation of a custom op runs: Triton, chunked PyTorch, or the reference.

Every public op takes ``impl="auto"|"triton"|"torch"|"reference"``. ``"auto"`` first looks for
a process-wide choice (``set_default_impl``, else the ``SIMCOT_KERNELS`` environment variable,
read at call time so a launcher or a test can flip it without re-importing), then picks
Triton for CUDA tensors when Triton is installed, and the chunked PyTorch path otherwise.

Triton also runs on CPU tensors under ``TRITON_INTERPRET=1`` (the variable must be set before
the kernel modules are imported): that is how CI tests the kernels themselves. ``"auto"``
never picks the interpreter; ask for it with ``impl="triton"``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "torch", "reference")
ENV = "SIMCOT_KERNELS"
_default: str | None = None


def set_default_impl(impl: str | None) -> str | None:
    """Make `impl` what "auto" means in this process (None: back to the env var / device rule).

    Returns the previous setting, so callers can restore it.
    """
    global _default
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; choose one of {IMPLS}")
    prev, _default = _default, (None if impl == "auto" else impl)
    return prev


@contextlib.contextmanager
def default_impl(impl: str | None):
    """``with default_impl("torch"): ...`` scopes `set_default_impl`."""
    prev = set_default_impl(impl)
    try:
        yield
    finally:
        set_default_impl(prev)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(impl: str, device: torch.device) -> str:
    """The concrete impl ("triton" | "torch" | "reference") for tensors on `device`."""
    if impl == "auto":
        impl = _default or os.environ.get(ENV, "").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r} (argument or ${ENV}); choose one of {IMPLS}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if impl == "triton":
        if not triton_installed():
            raise RuntimeError("impl='triton' but triton is not installed (pip install triton, or use impl='torch')")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(f"impl='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before "
                               "simcot.kernels runs a kernel (the CPU interpreter); use impl='torch' instead")
    return impl


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
