"""Linear + cross-entropy without the (N x V) logits: the reference, the chunked op, the public call.

Per token i (z = hidden @ weight.T + bias, lse = logsumexp(z), s = label_smoothing):

    loss_i = lse_i - (1 - s) * z_i[y_i] - s * mean_j z_ij + z_loss * lse_i**2     (0 if y_i == ignore_index)

which is ``F.cross_entropy(z, y, label_smoothing=s, reduction="none")`` plus the z-loss.

How the op avoids the logits: the tokens are cut into chunks of rows (``chunk_rows``). Per
chunk, one GEMM makes that chunk's logits (chunk x V, in the GEMM dtype); a row function computes
the loss with an fp32 log-sum-exp and, in backward, overwrites the logits with dloss/dlogits in
place (``_ce_rows_torch`` below, or the Triton kernel in ``linear_cross_entropy_triton.py``: the
same contract); two more GEMMs turn them into the chunk's rows of dX and its contribution to dW.

Where the gradients are made is one decision, ``hold_gradients``, taken from a memory budget
(``hold_mib``: the argument, else $SIMCOT_CE_HOLD_MIB, else 256 MiB). The budget is compared
with dW counted as its fp32 accumulator, 4·V·H bytes (0 when the weight needs no gradient):

- under the budget (a small head: 4·32000·512 B = 62.5 MiB), forward makes dX and dW with the
  loss, 6·N·H·V FLOPs as eager, and holds them until backward, which only scales them by the
  upstream gradient (in place; a second backward through a retained graph rescales a copy);
- at or above it (an 8B head: 4·128256·4096 B = 2004 MiB per call, twice for CODI's two calls),
  forward computes the loss only and saves the inputs; backward recomputes each chunk's logits
  (the Cut-Cross-Entropy trade: 8·N·H·V FLOPs) and makes dX and dW from them, so nothing of size
  V x H lives from forward to backward. The upstream gradient is known when dlogits are made.

``reduction="none"`` always recomputes: a per-token upstream gradient cannot be applied to a dW
summed over tokens afterwards. A budget of 0 always recomputes. Under ``no_grad`` the loss only.

Both paths cut the rows alike: on a GPU chunks as large as the weight (``chunk_rows``: H rows), so
dW's fp32 accumulator is read and written once per H rows rather than per 256; with N <= H there
is one chunk and dW is a single GEMM (on the CPU, 256-row chunks: see ``chunk_rows``). Peak extra
memory: one chunk of logits (plus an fp32 copy on the PyTorch path for half inputs), dW, and
under autocast a half-precision copy of the weight (as autocast itself makes for F.linear).
The recompute path's backward reads the weight again: under ZeRO-3 inside ``engine(...)`` DeepSpeed re-fetches it for
backward; elsewhere ``gathered`` gathers it (one more all-gather of the head per call).

No host syncs: the token count for "mean" stays a tensor, ignored tokens are masked, never
filtered.

Data-parallel ranks: the number of chunks follows the local token count, so it differs between
ranks, and that is safe by construction: the chunk loop issues no collective (the weight is a
plain tensor inside it, made whole once before the loop: by DeepSpeed's fetch of an external
parameter inside ``engine(...)``, else by ``simcot.kernels.gathered``), so unequal loop counts
cannot desynchronise the ranks. Equal counts would need an all-reduce of N (a host sync) per
call and buy nothing. tests/dist/zero3_fused_ce.py runs two ranks with unequal chunk counts.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from simcot.kernels.dispatch import resolve
from simcot.kernels.zero3 import gathered

REDUCTIONS = ("mean", "sum", "none")
HOLD_ENV = "SIMCOT_CE_HOLD_MIB"
DEFAULT_HOLD_MIB = 256.0


def linear_cross_entropy_reference(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                                   z_loss=0.0, label_smoothing=0.0):
    """Materialises the logits: the definition every other path is tested against."""
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = target != ignore_index
        loss = loss + z_loss * torch.logsumexp(logits, -1).pow(2) * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)


# ----------------------------------------------------------------------------- the row function


def _ce_rows_torch(logits, target, bias, loss_out, lse_out, *, ignore_index, z_loss, smoothing, scale, grad):
    """Loss and lse of each row of `logits` (c x V) into `loss_out`, `lse_out` (c,).

    With `grad`, `logits` is overwritten with ``scale * dloss/dlogits`` (`scale`: None, a 0-d
    tensor, or one value per row); ignored rows get exact zeros.
    """
    v = logits.shape[1]
    z = logits if logits.dtype == loss_out.dtype else logits.to(loss_out.dtype)  # fp32 working copy
    if bias is not None:
        z.add_(bias.to(z.dtype))
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)[:, None]
    z_y = z.gather(1, safe).squeeze(1)
    mean_z = z.mean(1) if smoothing else None
    m = z.amax(1, keepdim=True)
    p = z.sub_(m).exp_()  # in place: z is not needed any more
    s = p.sum(1)
    lse = m.squeeze(1) + s.log()
    loss = lse - (1.0 - smoothing) * z_y
    if smoothing:
        loss = loss - smoothing * mean_z
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss_out.copy_(torch.where(valid, loss, 0.0))
    lse_out.copy_(lse)
    if not grad:
        return
    g = valid.to(p.dtype)
    if scale is not None:
        g = g * scale
    # d/dz [lse + z_loss lse^2] = (1 + 2 z_loss lse) softmax;  d/dz [-(1-s) z_y - s mean z] = -(1-s) onehot - s/V
    p.mul_((g * (1.0 + 2.0 * z_loss * lse) / s)[:, None])
    p.scatter_add_(1, safe, (-(1.0 - smoothing) * g)[:, None])
    if smoothing:
        p.sub_((smoothing / v * g)[:, None])
    if p is not logits:
        logits.copy_(p)


def _rows_fn(backend: str):
    if backend == "triton":
        from simcot.kernels.linear_cross_entropy_triton import ce_rows_triton

        return ce_rows_triton
    return _ce_rows_torch


# --------------------------------------------------------------------------------- the chunk loop


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def chunk_rows(n: int, v: int, h: int, device: str = "cuda") -> int:
    """Rows per chunk, from a memory budget: on a GPU a logits chunk (rows x V) at most the size of
    the weight (V x H), i.e. H rows, but at least 256; on the CPU 256 rows; the n rows are then cut
    into equal chunks.

    Why H rows on a GPU: backward adds each chunk's dW = dlogits^T x (inner dimension: the chunk's
    rows) into one V x H fp32 accumulator, read and written once per chunk (8·V·H bytes) against
    6·rows·H·V FLOPs of GEMMs, so the accumulator costs 1.3/rows of the GEMM time in units of the
    machine's FLOP/byte ratio (~200 on an H100/H200): 256-row chunks (the old rule at N=8k,
    H=4096, V=128k) made the dW GEMMs memory-bound; 4096-row chunks make the accumulator ~7 % of
    the GEMM time, inside the GEMM's epilogue on CUDA. The transient logits chunk then weighs what
    the weight does (1 GiB in bf16 at H=4096, V=128k), and when N <= H there is a single chunk
    and no accumulator at all (dW is one GEMM, written once).

    Why 256 rows on the CPU: its FLOP/byte ratio is ~10, so the accumulator is already ~5 % of the
    GEMM time at 256 rows, and H-row chunks only raise the peak (at H=512, V=32000 fp32: 205 MiB
    against 143 MiB with 256 rows; benchmarks/results/linear_cross_entropy_cpu.md).
    """
    cap = max(256, h) if device == "cuda" else 256
    pieces = max(1, -(-n // cap))
    return max(1, -(-n // pieces))


def hold_budget_mib(hold_mib: float | None = None) -> float:
    """The budget for gradients held from forward to backward: `hold_mib`, else $SIMCOT_CE_HOLD_MIB,
    else 256 MiB."""
    if hold_mib is None:
        env = os.environ.get(HOLD_ENV, "").strip()
        if not env:
            return DEFAULT_HOLD_MIB
        try:
            hold_mib = float(env)
        except ValueError:
            raise ValueError(f"{HOLD_ENV} must be a number of MiB, got {env!r}") from None
    if not hold_mib >= 0:
        raise ValueError(f"the hold budget must be >= 0 MiB, got {hold_mib!r}")
    return float(hold_mib)


def hold_gradients(v: int, h: int, *, want_w: bool, reduction: str, hold_mib: float | None = None) -> bool:
    """Whether forward makes the gradients and holds them to backward (else backward recomputes).

    Held bytes are counted as dW's fp32 accumulator, 4·V·H (0 for a frozen weight; dX, N x H, is
    the size of the hidden states the recompute path saves instead). Holding saves a quarter of
    the FLOPs (6·N·H·V instead of 8) and costs those bytes per call until backward; it is taken
    when they are under the budget. "none" cannot hold: its per-token upstream gradient arrives
    only in backward, after dW has summed over the tokens.
    """
    if reduction == "none":
        return False
    held = 4 * v * h if want_w else 0
    return held < hold_budget_mib(hold_mib) * 2**20


@functools.cache
def _cuda_addmm_out_dtype() -> bool:
    """Whether cuBLAS can write a half-precision product straight into an fp32 tensor (torch>=2.8),
    both overwriting (beta=0: the NaNs already there must not leak) and accumulating in place."""
    try:  # probed exactly as used: out aliases the added tensor
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        acc = torch.full((2, 2), float("nan"), device="cuda")
        torch.addmm(acc, a, a, beta=0, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 4).all())
    except (RuntimeError, TypeError):
        return False


def _mm_into_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """acc = a @ b (`first`: acc is not read) or acc += a @ b; acc may be fp32 while a, b are half.

    On CUDA the addition happens inside the GEMM (cuBLAS beta=1, fp32 out): no separate pass over acc.
    """
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.is_cuda and _cuda_addmm_out_dtype():
        torch.addmm(acc, a, b, beta=0 if first else 1, out_dtype=acc.dtype, out=acc)
    elif first:
        acc.copy_(a @ b)
    else:
        acc.add_(a @ b)  # a (V x H) half-precision temporary per chunk (CPU: no fp32-out GEMM)


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: autocast's for fp32 inputs inside an autocast region (as F.linear would
    run), else the inputs' own."""
    dev = hidden.device.type
    if hidden.dtype == weight.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _chunks(hidden, weight, bias, target, *, cdtype, opts, backend, chunk, scale, want_x, want_w, want_b):
    """Loss and lse per row and, when any want_*, the wanted gradients times `scale`.

    The GEMMs run in `cdtype` (a half copy of the weight under autocast, made once per call, as
    autocast itself would); dX comes back in hidden's dtype, dW in the weight's and db in fp32.
    dW: one chunk writes it with a single GEMM in the weight's dtype; several add into one fp32
    accumulator (for half weights) that is converted once at the end.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    rows = _rows_fn(backend)
    grad = want_x or want_w or want_b
    wc = weight.to(cdtype)
    loss = torch.empty(n, dtype=acc_dtype(cdtype), device=hidden.device)
    lse = torch.empty_like(loss)
    step = chunk or chunk_rows(n, v, h, hidden.device.type)
    single = step >= n
    gx = torch.empty_like(hidden) if want_x else None
    gw = None
    if want_w:
        gw_dtype = weight.dtype if single else acc_dtype(weight.dtype)
        gw = (torch.empty if n else torch.zeros)(v, h, dtype=gw_dtype, device=weight.device)
    gb = torch.zeros(v, dtype=acc_dtype(bias.dtype), device=bias.device) if want_b else None
    per_row = scale is not None and scale.dim() == 1
    for s in range(0, n, step):
        e = min(s + step, n)
        xc = hidden[s:e].to(cdtype)
        logits = xc @ wc.T  # (c, V): the only logits that ever exist
        rows(logits, target[s:e], bias, loss[s:e], lse[s:e], scale=scale[s:e] if per_row else scale, grad=grad,
             **opts)
        if want_x:
            if gx.dtype == cdtype:
                torch.mm(logits, wc, out=gx[s:e])
            else:
                gx[s:e] = logits @ wc
        if want_w:
            _mm_into_(gw, logits.T, xc, first=s == 0)
        if want_b:
            gb += logits.sum(0, dtype=gb.dtype)
        del logits, xc  # before the next chunk's GEMM allocates: one logits chunk alive at a time, not two
    if gw is not None:
        gw = gw.to(weight.dtype)  # fp32 accumulator -> the parameter's dtype (no-op for one chunk)
    return loss, lse, gx, gw, gb


class LinearCrossEntropy(torch.autograd.Function):
    """Chunked linear + cross-entropy; `backend` picks the row function ("torch" or "triton").

    `hold` (from ``hold_gradients``): forward makes dX and dW and holds them, backward scales them;
    else forward computes the loss only and backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, z_loss, smoothing, chunk, backend,
                cdtype, hold):
        hidden, target = hidden.contiguous(), target.contiguous()
        opts = dict(ignore_index=ignore_index, z_loss=float(z_loss), smoothing=float(smoothing))
        ctx.run = dict(cdtype=cdtype, opts=opts, backend=backend, chunk=chunk)
        ctx.reduction, ctx.hold = reduction, hold
        ctx.b_dtype = bias.dtype if bias is not None else None
        if not hold:
            loss, _, _, _, _ = _chunks(hidden, weight, bias, target, **ctx.run, scale=None, want_x=False,
                                       want_w=False, want_b=False)
            ctx.save_for_backward(hidden, weight, bias, target)  # the parameters themselves, not copies
            if reduction == "none":
                return loss
            total = loss.sum()
            return total / _n_valid(target, ignore_index, loss.dtype) if reduction == "mean" else total
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        n_valid = _n_valid(target, ignore_index, acc_dtype(cdtype)) if reduction == "mean" else None
        loss, _, gx, gw, gb = _chunks(hidden, weight, bias, target, **ctx.run,
                                      scale=None if n_valid is None else 1.0 / n_valid,
                                      want_x=want_x, want_w=want_w, want_b=want_b)
        ctx.save_for_backward(gx, gw, gb)  # released after backward, so autograd can adopt them as .grad
        ctx.applied = None
        total = loss.sum()
        return total / n_valid if n_valid is not None else total

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # the GEMM dtype was fixed in forward
            if ctx.hold:
                gx, gw, gb = LinearCrossEntropy._scale_held(ctx, grad_out.detach())
            else:
                gx, gw, gb = LinearCrossEntropy._recompute(ctx, grad_out.detach())
        gb = gb.to(ctx.b_dtype) if gb is not None else None  # fp32 accumulator -> the bias's dtype
        return gx, gw, gb, None, None, None, None, None, None, None, None, None

    @staticmethod
    def _recompute(ctx, grad_out):
        hidden, weight, bias, target = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        scale = grad_out.to(acc_dtype(ctx.run["cdtype"])).contiguous()  # () or (N,)
        if ctx.reduction == "mean":
            scale = scale / _n_valid(target, ctx.run["opts"]["ignore_index"], scale.dtype)
        # under ZeRO-3 inside engine(...) DeepSpeed re-fetched the weight for backward; outside, gather it
        with gathered(weight, bias):
            _, _, gx, gw, gb = _chunks(hidden, weight, bias, target, **ctx.run, scale=scale, want_x=want_x,
                                       want_w=want_w, want_b=want_b)
        return gx, gw, gb

    @staticmethod
    def _scale_held(ctx, grad_out):
        gx, gw, gb = ctx.saved_tensors
        if ctx.applied is None:  # in place: dW is as large as the weight, a copy would raise the peak
            for g in (gx, gw, gb):
                if g is not None:
                    g.data.mul_(grad_out.to(g.dtype))  # .data: ours alone; a retained graph stays usable
            ctx.applied = grad_out.clone()
            return gx, gw, gb
        # another backward through a retained graph (gradcheck does this): rescale a copy
        if bool(ctx.applied == 0):
            raise RuntimeError("fused_linear_cross_entropy: a second backward after one with a zero upstream "
                               "gradient cannot be served (the held gradients were scaled to 0); pass hold_mib=0")
        r = grad_out / ctx.applied
        return tuple(g * r.to(g.dtype) if g is not None else None for g in (gx, gw, gb))


def _n_valid(target: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """Non-ignored tokens, at least 1, as a tensor (no host sync)."""
    return (target != ignore_index).sum().clamp(min=1).to(dtype)


def fused_linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                               z_loss=0.0, label_smoothing=0.0, impl="auto", chunk_size=None, hold_mib=None):
    """``CE(hidden @ weight.T + bias, target)`` without the (N x V) logits.

    hidden (N, H), weight (V, H), target (N,) long, bias (V,) or None. Inputs may be fp32, bf16 or
    fp16; the log-sum-exp, the loss and dW accumulate in fp32 and the loss is fp32. Under autocast
    with fp32 inputs the GEMMs run in the autocast dtype (as ``F.linear`` would) while dW still
    accumulates in fp32 and is returned in fp32. ``reduction``:
    "mean" over non-ignored tokens (0 when there are none), "sum", or "none" (per token, 0 at
    ignored ones). ``z_loss`` adds ``z_loss * lse**2`` per non-ignored token; ``label_smoothing``
    is ``F.cross_entropy``'s. ``impl``: "auto" (Triton on CUDA, else the chunked PyTorch path; see
    ``simcot.kernels.dispatch``), "triton", "torch" or "reference" (materialises the logits).
    ``chunk_size``: rows per chunk (default: ``chunk_rows``). ``hold_mib``: the budget under which
    forward makes the gradients and holds them to backward (default: $SIMCOT_CE_HOLD_MIB, else 256;
    0: always recompute in backward; see ``hold_gradients``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or target.dim() != 1 or hidden.shape[1] != weight.shape[1] \
            or hidden.shape[0] != target.shape[0]:
        raise ValueError(f"expected hidden (N, H), weight (V, H), target (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(target.shape)}")
    impl = resolve(impl, hidden.device)
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                              reduction=reduction, z_loss=z_loss, label_smoothing=label_smoothing)
    cdtype = gemm_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):  # the GEMM dtype is chosen explicitly
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
            hold = hold_gradients(weight.shape[0], weight.shape[1], want_w=weight.requires_grad, reduction=reduction,
                                  hold_mib=hold_mib)
            return LinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, reduction, z_loss,
                                            label_smoothing, chunk_size, impl, cdtype, hold)
        # no autograd (eval, no_grad): the loss only, without saving inputs for a backward
        loss, _, _, _, _ = _chunks(hidden.contiguous(), weight, bias, target.contiguous(), cdtype=cdtype,
                                   opts=dict(ignore_index=ignore_index, z_loss=float(z_loss),
                                             smoothing=float(label_smoothing)),
                                   backend=impl, chunk=chunk_size, scale=None, want_x=False, want_w=False,
                                   want_b=False)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / (target != ignore_index).sum().clamp(min=1) if reduction == "mean" else total
