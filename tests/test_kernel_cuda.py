"""The compiled Triton kernels on a GPU, against the references, at realistic shapes.

Skipped unless CUDA is present and the interpreter is off (conftest turns it on by default):

    TRITON_INTERPRET=0 python -m pytest -q tests/test_kernel_cuda.py

Never run on the CPU-only build machine: written for a GPU user, unmeasured here.
"""

import os

import pytest
import torch

from simcot.kernels import (fused_linear_cross_entropy, latent_feedback, latent_feedback_reference,
                            linear_cross_entropy_reference)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA and TRITON_INTERPRET=0")

@pytest.fixture(params=["recompute", "hold"])
def placement(request, monkeypatch):
    """Both placements of the gradients (``hold_gradients``): recomputed in backward, held from forward."""
    monkeypatch.setenv("SIMCOT_CE_HOLD_MIB", "0" if request.param == "recompute" else "4096")
    return request.param


TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}  # TF32 may be on for fp32 GEMMs


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,h,v", [(1000, 512, 32000), (333, 256, 128256)])
def test_fused_ce_on_cuda(placement, dtype, reduction, n, h, v):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, h, generator=g).to("cuda", dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * h ** -0.5).to("cuda", dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).cuda()
    y[::7] = -100
    kw = dict(reduction=reduction, z_loss=1e-4, label_smoothing=0.1)
    got = fused_linear_cross_entropy(x, w, y, impl="auto", chunk_size=128, **kw)  # auto = Triton on CUDA
    ref = linear_cross_entropy_reference(x, w, y, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    up = torch.randn_like(got) if reduction == "none" else torch.tensor(1.0, device="cuda")
    for a, r in zip(torch.autograd.grad(got, (x, w), up), torch.autograd.grad(ref, (x, w), up)):
        assert rel_err(a, r) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b", [8, 256])
def test_latent_feedback_on_cuda(dtype, b):
    g = torch.Generator(device="cpu").manual_seed(0)
    h, v = 4096, 32000

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype).requires_grad_()

    hidden, emb = t(b, h), t(v, h, scale=0.02)
    proj = (t(h, h, scale=h ** -0.5), t(h), t(h, h, scale=h ** -0.5), t(h))
    norm = (t(h), t(h), 1e-5)
    thinking = (torch.arange(b) % 3 != 0).cuda()
    ids = torch.randint(0, v, (b,), generator=g).cuda()
    params = [hidden, emb, *proj, *norm[:2]]
    got = latent_feedback(hidden, thinking, ids, emb, proj=proj, norm=norm)  # auto = Triton on CUDA
    ref = latent_feedback_reference(hidden, thinking, ids, emb, proj=proj, norm=norm)
    assert rel_err(got, ref) < TOL[dtype]
    up = torch.randn_like(got)
    for a, r in zip(torch.autograd.grad(got, params, up), torch.autograd.grad(ref, params, up)):
        assert rel_err(a, r) < TOL[dtype]


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-params-autocast"])
@pytest.mark.parametrize("n", [300, 5000], ids=["one-chunk", "ten-chunks"])
def test_fused_ce_default_chunking_on_cuda(placement, autocast, n):
    """The default chunks (H rows): one chunk writes dW with a single GEMM (fp32 out of a bf16 GEMM
    under autocast), several accumulate in fp32 inside the GEMM (cuBLAS beta=0, then beta=1)."""
    h, v = 512, 32000
    dtype = torch.float32 if autocast else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(n, h, generator=g).to("cuda", dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * h ** -0.5).to("cuda", dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).cuda()
    y[::5] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        got = fused_linear_cross_entropy(x, w, y)
        ref = linear_cross_entropy_reference(x, w, y)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for a, r in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(ref, (x, w))):
        assert a.dtype == r.dtype == dtype and rel_err(a, r) < TOL[torch.bfloat16]
