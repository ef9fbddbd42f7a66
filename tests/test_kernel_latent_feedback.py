"""Latent feedback: the PyTorch and Triton (TRITON_INTERPRET=1) epilogues against the unfused
reference, forward and every gradient, for Coconut (identity), CODI (proj + LayerNorm) and the
combinations in between; exact zeros where a row was not selected; gradcheck in float64.

Tolerances are max|got - ref| / max|ref| per tensor: fp32 1e-5, fp16 3e-3, bf16 2e-2 (the
epilogue computes in fp32 where the reference rounds to the input dtype between ops).
"""

import pytest
import torch

from simcot.kernels import latent_feedback, latent_feedback_reference

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
IMPLS = ["torch", "triton"]
MODES = ["identity", "proj", "norm", "proj+norm", "proj+norm-no-bias"]


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def make(mode, dtype, b=7, h=24, p=40, v=50, seed=0, pdtype=None):
    """B=7 rows (H=24: not a power of two), rows 0, 2, 3, 6 thinking with invalid ids, two token
    rows sharing id 3 (their embedding grads must add up)."""
    g = torch.Generator().manual_seed(seed)
    pdtype = pdtype or dtype

    def t(*shape, scale=1.0, dt=None):
        return (torch.randn(*shape, generator=g) * scale).to(dt or pdtype).requires_grad_()

    hidden, emb = t(b, h, dt=dtype), t(v, h)
    if b <= 7:
        thinking = torch.tensor([1, 0, 1, 1, 0, 0, 1][:b], dtype=torch.bool)
        ids = torch.tensor([999, 3, -5, 2, 3, 7, 1][:b])
    else:  # a random half thinks; token rows draw ids with repeats
        thinking = torch.rand(b, generator=g) < 0.5
        ids = torch.where(thinking, torch.full((b,), 10**6), torch.randint(0, v, (b,), generator=g))
    proj = (t(p, h, scale=0.3), t(p), t(h, p, scale=0.3), t(h)) if "proj" in mode else None
    norm = None
    if "norm" in mode:
        norm = (t(h, scale=0.5), None if "no-bias" in mode else t(h), 1e-5)
    params = [hidden, emb] + list(proj or []) + [x for x in (norm or [])[:2] if x is not None]
    return hidden, thinking, ids, emb, proj, norm, params


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(impl, mode, dtype):
    hidden, thinking, ids, emb, proj, norm, params = make(mode, dtype)
    got = latent_feedback(hidden, thinking, ids, emb, proj=proj, norm=norm, impl=impl)
    ref = latent_feedback_reference(hidden, thinking, ids, emb, proj=proj, norm=norm)
    assert got.dtype == ref.dtype == emb.dtype and got.shape == ref.shape
    assert torch.equal(got[~thinking], emb[ids[~thinking]])  # token rows: the embedding rows, bit for bit
    assert rel_err(got, ref) < TOL[dtype]
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(got.dtype)
    g_got = torch.autograd.grad(got, params, upstream)
    g_ref = torch.autograd.grad(ref, params, upstream)
    for i, (a, r) in enumerate(zip(g_got, g_ref)):
        assert a.dtype == r.dtype and a.shape == r.shape, i
        assert rel_err(a, r) < TOL[dtype], (i, rel_err(a, r))
    d_hidden, d_emb = g_got[0], g_got[1]
    assert torch.equal(d_hidden[~thinking], torch.zeros_like(d_hidden[~thinking]))
    used = torch.zeros(emb.shape[0], dtype=torch.bool)
    used[ids[~thinking]] = True
    assert torch.equal(d_emb[~used], torch.zeros_like(d_emb[~used]))  # exactly zero, not just small
    torch.testing.assert_close(d_emb[3].float(), upstream[1].float() + upstream[4].float(), rtol=TOL[dtype],
                               atol=TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["identity", "proj+norm"])
@pytest.mark.parametrize("b, h, p", [(1, 8, 8), (33, 64, 96), (64, 130, 40), (9, 257, 17)])
def test_shape_grid(impl, mode, b, h, p):
    """Batch sizes from 1 to a rollout batch, widths on and off the power-of-two block (H=130, 257)."""
    hidden, thinking, ids, emb, proj, norm, params = make(mode, torch.float32, b=b, h=h, p=p, v=70, seed=b)
    got = latent_feedback(hidden, thinking, ids, emb, proj=proj, norm=norm, impl=impl)
    ref = latent_feedback_reference(hidden, thinking, ids, emb, proj=proj, norm=norm)
    assert got.shape == (b, h) and rel_err(got, ref) < 1e-5
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    for a, r in zip(torch.autograd.grad(got, params, upstream), torch.autograd.grad(ref, params, upstream)):
        assert rel_err(a, r) < 1e-5 if r.abs().max() > 0 else torch.equal(a, r)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern", ["all-thinking", "none-thinking"])
def test_all_or_no_rows_thinking(impl, pattern):
    hidden, thinking, ids, emb, proj, norm, params = make("proj+norm", torch.float32)
    thinking[:] = pattern == "all-thinking"
    ids = ids.clamp(0, emb.shape[0] - 1) if pattern == "none-thinking" else ids
    got = latent_feedback(hidden, thinking, ids, emb, proj=proj, norm=norm, impl=impl)
    ref = latent_feedback_reference(hidden, thinking, ids, emb, proj=proj, norm=norm)
    assert rel_err(got, ref) < 1e-5
    for a, r in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(ref.sum(), params)):
        assert torch.isfinite(a).all()
        assert rel_err(a, r) < 1e-5 if r.abs().max() > 0 else torch.equal(a, r)


@pytest.mark.parametrize("impl", IMPLS)
def test_under_autocast_with_fp32_parameters(impl):
    """As in training: fp32 master parameters, bf16 GEMMs under autocast, fp32 out."""
    hidden, thinking, ids, emb, proj, norm, params = make("proj+norm", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = latent_feedback(hidden, thinking, ids, emb, proj=proj, norm=norm, impl=impl)
        ref = latent_feedback_reference(hidden, thinking, ids, emb, proj=proj, norm=norm)
    assert got.dtype == ref.dtype == torch.float32
    assert rel_err(got, ref) < 2e-2
    for a, r in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(ref.sum(), params)):
        assert a.dtype == r.dtype and rel_err(a, r) < 3e-2


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("mode", ["identity", "proj+norm", "norm"])
def test_gradcheck_float64(impl, mode):
    hidden, thinking, ids, emb, proj, norm, params = make(mode, torch.float64, b=5, h=6, p=5, v=8)
    ids = ids.clamp(max=7)
    n_proj = 4 if proj else 0

    def f(hidden, emb, *rest):
        pr = tuple(rest[:n_proj]) if proj else None
        nm = (rest[n_proj], rest[n_proj + 1], 1e-5) if norm else None
        return latent_feedback(hidden, thinking, ids, emb, proj=pr, norm=nm, impl=impl)

    assert torch.autograd.gradcheck(f, tuple(params), eps=1e-6, atol=1e-6)


def test_rejects_bad_arguments():
    hidden, thinking, ids, emb, *_ = make("identity", torch.float32)
    with pytest.raises(TypeError, match="bool"):
        latent_feedback(hidden, thinking.long(), ids, emb)
    with pytest.raises(ValueError, match="expected"):
        latent_feedback(hidden, thinking[:3], ids, emb)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["identity", "proj+norm"])
def test_no_grad_rollout(impl, mode):
    hidden, thinking, ids, emb, proj, norm, _ = make(mode, torch.float32)
    with torch.no_grad():
        got = latent_feedback(hidden, thinking, ids, emb, proj=proj, norm=norm, impl=impl)
        ref = latent_feedback_reference(hidden, thinking, ids, emb, proj=proj, norm=norm)
    assert not got.requires_grad and rel_err(got, ref) < 1e-5
