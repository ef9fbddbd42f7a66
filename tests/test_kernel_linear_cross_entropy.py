"""Fused linear cross-entropy: every path (chunked PyTorch, Triton under TRITON_INTERPRET=1) against
the logits-materialising reference, forward and all gradients, over dtypes, reductions, options
and awkward shapes; gradcheck in float64; the op never builds an (N x V) tensor.

Tolerances are max|got - ref| / max|ref| over a tensor, per input dtype: fp32 1e-5, fp16 3e-3,
bf16 2e-2 for gradients (half-precision dlogits feed half-precision GEMMs, as in eager autocast);
losses are fp32 in every path and agree to 1e-5 (fp32) / 1e-4 (half, relative).

Every test runs twice, once per placement of the gradients (``hold_gradients``): made in backward
by recomputing the logits ($SIMCOT_CE_HOLD_MIB=0) and made in forward and held (a budget far above
these shapes; "none" recomputes in both).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import simcot.kernels.linear_cross_entropy_triton as tri
from conftest import Created
from simcot.kernels import default_impl, fused_linear_cross_entropy, linear_cross_entropy_reference, set_default_impl
from simcot.kernels.dispatch import resolve
from simcot.kernels.linear_cross_entropy import HOLD_ENV, chunk_rows, hold_budget_mib, hold_gradients

GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
IMPLS = ["torch", "triton"]


@pytest.fixture(autouse=True, params=["recompute", "hold"])
def placement(request, monkeypatch):
    """The budget for held gradients, through the environment (the default when no hold_mib is passed)."""
    monkeypatch.setenv(HOLD_ENV, "0" if request.param == "recompute" else "4096")
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    """Triton blocks of 128 columns, so V=300 is three blocks, the last one ragged."""
    monkeypatch.setattr(tri, "MAX_BLOCK_V", 128)


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def make(n, h, v, dtype, *, bias=True, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return x, w, b, y


def check(impl, x, w, b, y, dtype, *, reduction, chunk=None, grad_tol=None, **opts):
    inputs = [t for t in (x, w, b) if t is not None]
    got = fused_linear_cross_entropy(x, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=chunk, **opts)
    ref = linear_cross_entropy_reference(x, w, y, bias=b, reduction=reduction, **opts)
    assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=LOSS_TOL[dtype], atol=LOSS_TOL[dtype])
    upstream = (torch.randn(got.shape, generator=torch.Generator().manual_seed(1)) if reduction == "none"
                else torch.tensor(1.7))  # not 1: the upstream gradient must be applied
    g_got = torch.autograd.grad(got, inputs, upstream)
    g_ref = torch.autograd.grad(ref, inputs, upstream)
    for name, a, r in zip("xwb", g_got, g_ref):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) < (grad_tol or GRAD_TOL[dtype]), (name, rel_err(a, r))


# ------------------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference_with_every_option(small_blocks, impl, reduction, dtype):
    # 37 rows in chunks of 8 (the last ragged), V=300 in blocks of 128 (the last ragged), 1 in 5 ignored
    x, w, b, y = make(37, 16, 300, dtype)
    check(impl, x, w, b, y, dtype, reduction=reduction, chunk=8, z_loss=1e-2, label_smoothing=0.1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("option", ["plain", "bias", "z_loss", "label_smoothing", "ignore_index=0"])
def test_each_option_alone(impl, option):
    x, w, b, y = make(24, 8, 100, torch.float32, bias=option == "bias", ignore_every=0 if option == "plain" else 5)
    opts = {"z_loss": {"z_loss": 1e-1}, "label_smoothing": {"label_smoothing": 0.3}}.get(option, {})
    if option == "ignore_index=0":
        y[y == -100] = 0
        opts = {"ignore_index": 0}
    check(impl, x, w, b, y, torch.float32, reduction="mean", chunk=10, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,h,v,chunk", [(1, 8, 5, None), (0, 8, 5, None), (64, 8, 129, 64), (50, 4, 64, 7),
                                         (33, 8, 200, None), (17, 8, 1, 4)])
def test_shapes(small_blocks, impl, n, h, v, chunk):
    x, w, b, y = make(n, h, v, torch.float32, ignore_every=3)
    tol = 1e-4 if v == 1 else None  # V=1: the gradient is 1 - softmax = 1 - 1, all cancellation
    for reduction in ("sum", "mean"):
        check(impl, x, w, b, y, torch.float32, reduction=reduction, chunk=chunk, grad_tol=tol, z_loss=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_tokens_ignored_gives_zero_loss_and_zero_grads(impl, reduction, dtype):
    x, w, b, y = make(12, 8, 40, dtype)
    y[:] = -100
    loss = fused_linear_cross_entropy(x, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=5, z_loss=1e-2,
                                      label_smoothing=0.1)
    assert torch.equal(loss, torch.zeros_like(loss))
    grads = torch.autograd.grad(loss.sum(), (x, w, b))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))  # exact zeros, no NaN from 0/0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_under_autocast_with_fp32_inputs(impl, reduction):
    """As in training: fp32 parameters, bf16 GEMMs under autocast; the gradients come back in fp32."""
    x, w, b, y = make(37, 16, 300, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(x, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=16)
        ref = linear_cross_entropy_reference(x, w, y, bias=b, reduction=reduction)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # both round the logits to bf16
    for a, r in zip(torch.autograd.grad(got.sum(), (x, w, b)), torch.autograd.grad(ref.sum(), (x, w, b))):
        assert a.dtype == r.dtype == torch.float32
        assert rel_err(a, r) < GRAD_TOL[torch.bfloat16]


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_and_frozen_hidden(impl):
    x, w, _, y = make(20, 8, 50, torch.float32, bias=False)
    gx = torch.autograd.grad(fused_linear_cross_entropy(x, w.detach(), y, impl=impl, chunk_size=6), x)[0]
    gx_ref = torch.autograd.grad(linear_cross_entropy_reference(x, w.detach(), y), x)[0]
    gw = torch.autograd.grad(fused_linear_cross_entropy(x.detach(), w, y, impl=impl, chunk_size=6), w)[0]
    gw_ref = torch.autograd.grad(linear_cross_entropy_reference(x.detach(), w, y), w)[0]
    assert rel_err(gx, gx_ref) < 1e-5 and rel_err(gw, gw_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_gives_the_loss(impl):
    x, w, b, y = make(20, 8, 50, torch.float32)
    with torch.no_grad():
        for reduction in ("mean", "sum", "none"):
            got = fused_linear_cross_entropy(x, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=6)
            ref = linear_cross_entropy_reference(x, w, y, bias=b, reduction=reduction)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_retained_graph_gives_the_same_gradients_twice():
    x, w, b, y = make(20, 8, 50, torch.float32)
    loss = fused_linear_cross_entropy(x, w, y, bias=b, impl="torch", chunk_size=6)
    first = torch.autograd.grad(2.0 * loss, (x, w, b), retain_graph=True)
    second = torch.autograd.grad(3.0 * loss, (x, w, b))
    for a, c in zip(first, second):
        torch.testing.assert_close(1.5 * a, c)


# --------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(impl, reduction):
    x, w, b, y = make(7, 4, 9, torch.float64, ignore_every=4)

    def f(x, w, b):
        return fused_linear_cross_entropy(x, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=3,
                                          z_loss=0.1, label_smoothing=0.2)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- memory and dispatch


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_path_never_builds_the_logits(reduction):
    n, h, v, chunk = 256, 16, 1000, 32
    x, w, b, y = make(n, h, v, torch.float32)
    for impl, small in (("torch", True), ("reference", False)):
        with LargestTensor() as probe:
            loss = fused_linear_cross_entropy(x, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=chunk)
            loss.sum().backward()
        if small:  # one chunk of logits (chunk x V) or dW (V x H), never N x V
            assert probe.numel <= max(chunk * v, v * h), probe.numel
        else:
            assert probe.numel >= n * v  # the probe sees the reference's logits




@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_sized_tensors_held_from_forward_to_backward(placement, impl, reduction):
    """Two calls before one backward, as CODI makes. Recompute: the gradients are made in backward,
    so no V x H tensor made in forward outlives it (before acb07f7: an fp32 dW per call, whatever
    its size). Hold: one dW per call lives until backward ("none" recomputes)."""
    n, h, v = 40, 8, 300
    x, w, b, y = make(n, h, v, torch.float32)
    with Created() as probe:
        first = fused_linear_cross_entropy(x, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=16)
        second = fused_linear_cross_entropy(x * 2, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=16)
    alive = {ref().untyped_storage().data_ptr(): (dt, k) for ref, dt, k in probe.made
             if k == (v, h) and ref() is not None}  # by storage: views of one held dW count once
    held = 2 if placement == "hold" and reduction != "none" else 0
    assert list(alive.values()) == [(torch.float32, (v, h))] * held, alive
    got = torch.autograd.grad((first + second).sum(), (x, w, b))
    ref = linear_cross_entropy_reference(x, w, y, bias=b, reduction=reduction)
    ref = ref + linear_cross_entropy_reference(x * 2, w, y, bias=b, reduction=reduction)
    for a, r in zip(got, torch.autograd.grad(ref.sum(), (x, w, b))):
        assert rel_err(a, r) < GRAD_TOL[torch.float32]


def test_hold_decision_from_the_budget(monkeypatch):
    """dW counted in fp32 (4·V·H bytes) against the budget: argument, else environment, else 256 MiB."""
    monkeypatch.delenv(HOLD_ENV)
    assert hold_budget_mib() == 256
    assert hold_gradients(32000, 512, want_w=True, reduction="mean")  # 62.5 MiB: held
    assert not hold_gradients(128256, 4096, want_w=True, reduction="mean")  # 2004 MiB (8B head): recomputed
    assert not hold_gradients(32000, 512, want_w=True, reduction="none")  # per-token upstream: recomputed
    assert hold_gradients(128256, 4096, want_w=False, reduction="sum")  # frozen weight: no dW to hold
    assert hold_gradients(128256, 4096, want_w=True, reduction="mean", hold_mib=2005)
    assert not hold_gradients(128256, 4096, want_w=True, reduction="mean", hold_mib=2004)  # exactly 2004 MiB: not under
    assert not hold_gradients(10, 10, want_w=False, reduction="mean", hold_mib=0)  # 0: always recompute
    monkeypatch.setenv(HOLD_ENV, "4096")
    assert hold_gradients(128256, 4096, want_w=True, reduction="mean")
    assert not hold_gradients(128256, 4096, want_w=True, reduction="mean", hold_mib=1)  # the argument wins
    monkeypatch.setenv(HOLD_ENV, "lots")
    with pytest.raises(ValueError, match="SIMCOT_CE_HOLD_MIB must be a number of MiB, got 'lots'"):
        hold_budget_mib()
    with pytest.raises(ValueError, match="the hold budget must be >= 0 MiB"):
        hold_budget_mib(-1)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_chunk_needs_no_fp32_accumulator(impl):
    """bf16 weights, N <= H rows (the default chunking's single chunk): dW is one GEMM written in
    bf16, no fp32 V x H accumulator exists (before: one, read and written once per chunk)."""
    n, h, v = 200, 16, 300
    x, w, b, y = make(n, h, v, torch.bfloat16)
    assert chunk_rows(n, v, h) == n
    with Created() as probe:
        loss = fused_linear_cross_entropy(x, w, y, bias=b, impl=impl)
        got = torch.autograd.grad(loss, (x, w, b))
    assert not [k for _, dt, k in probe.made if dt == torch.float32 and k == (v, h)]
    ref = linear_cross_entropy_reference(x, w, y, bias=b)
    for a, r in zip(got, torch.autograd.grad(ref, (x, w, b))):
        assert a.dtype == r.dtype and rel_err(a, r) < GRAD_TOL[torch.bfloat16]


def test_default_chunk_rows():
    # a logits chunk as large as the weight: H rows (at least 256), the rows cut into equal chunks
    assert chunk_rows(32768, 128256, 4096) == 4096  # 8 chunks: dW's accumulator passes 8, not 32
    assert chunk_rows(4096, 128256, 4096) == 4096  # one chunk: dW is one GEMM, no accumulator
    assert chunk_rows(5000, 128256, 4096) == 2500  # two equal chunks, not 4096 + 904
    assert chunk_rows(2048, 128256, 64) == 256  # the 256-row floor
    assert chunk_rows(10, 32000, 512) == 10  # never more than N
    assert chunk_rows(0, 32000, 512) == 1


def test_cpu_chunks_are_256_rows():
    """On the CPU the logits chunk stays 256 rows whatever H (before: H rows, a 1.43x peak at
    H=512, V=32000 in benchmarks/results/linear_cross_entropy_cpu.md); GPUs keep H-row chunks."""
    assert chunk_rows(1024, 32000, 512, "cpu") == 256
    assert chunk_rows(1024, 32000, 512, "cuda") == 512
    assert chunk_rows(300, 32000, 512, "cpu") == 150  # two equal chunks
    n, h, v = 1024, 384, 64  # H-row chunks would be 342 rows (three equal chunks)
    x, w, b, y = make(n, h, v, torch.float32)
    with Created() as probe:
        loss = fused_linear_cross_entropy(x, w, y, bias=b, impl="torch")
        loss.backward()
    logits_rows = {k[0] for _, _, k in probe.made if len(k) == 2 and k[1] == v and k[0] != h}  # not W.T
    assert logits_rows == {256}, logits_rows


def test_impl_choice(monkeypatch):
    x, w, b, y = make(6, 4, 9, torch.float32)
    calls = []
    real = linear_cross_entropy_reference

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr("simcot.kernels.linear_cross_entropy.linear_cross_entropy_reference", spy)
    monkeypatch.setenv("SIMCOT_KERNELS", "reference")
    fused_linear_cross_entropy(x, w, y)
    assert len(calls) == 1
    with default_impl("torch"):  # set_default_impl wins over the variable
        fused_linear_cross_entropy(x, w, y)
    assert len(calls) == 1
    monkeypatch.delenv("SIMCOT_KERNELS")
    fused_linear_cross_entropy(x, w, y)  # auto on CPU: the chunked PyTorch path
    assert len(calls) == 1
    with pytest.raises(ValueError, match="unknown kernel impl"):
        fused_linear_cross_entropy(x, w, y, impl="cuda")
    with pytest.raises(ValueError):
        set_default_impl("fast")
    assert resolve("auto", torch.device("cuda")) == "triton" and resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_linear_cross_entropy(x, w, y, impl="triton")
