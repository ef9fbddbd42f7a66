"""Linear + cross-entropy without the (N x V) logits: the reference, the chunked op, the public call.

Per token i (z = hidden @ weight.T + bias, lse = logsumexp(z), s = label_smoothing):

    loss_i = lse_i - (1 - s) * z_i[y_i] - s * mean_j z_ij + z_loss * lse_i**2     (0 if y_i == ignore_index)

which is ``F.cross_entropy(z, y, label_smoothing=s, reduction="none")`` plus the z-loss.

How the op avoids the logits: the tokens are cut into chunks of rows (``chunk_rows``). Per
chunk, one GEMM makes that chunk's logits (chunk x V, in the GEMM dtype); a row function computes
the loss with an fp32 log-sum-exp and overwrites the logits with dloss/dlogits in place
(``_ce_rows_torch`` below, or the Triton kernel in ``linear_cross_entropy_triton.py``: the same
contract); two more GEMMs turn them into the chunk's rows of dX and a contribution to dW,
accumulated in fp32. Peak extra memory: one chunk of logits (plus an fp32 copy on the PyTorch
path for half inputs), dW, and under autocast a half-precision copy of the weight (as autocast
itself makes for F.linear).

Gradients are computed in forward (as Liger-Kernel does) for "mean" and "sum": the upstream
gradient of a scalar loss is one number, so dX and dW are made while each logits chunk is at hand
and only multiplied by it in backward. That costs 6·N·H·V FLOPs, the same as eager, and backward
never touches the weight, which matters under ZeRO-3, where the weight is whole only around the
forward call. The price: the gradient work happens in forward whenever autograd is on and an
input requires grad (under no_grad the op computes the loss only). For ``reduction="none"`` the
upstream gradient differs per token and is unknown in forward, and dW = sum_i g_i dlogits_i^T x_i
cannot be rescaled afterwards, so backward recomputes the logits chunk by chunk (8·N·H·V FLOPs);
under ZeRO-3 it makes sure the weight is whole again there (``gathered``).

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

import torch
import torch.nn.functional as F

from simcot.kernels.dispatch import resolve
from simcot.kernels.zero3 import gathered

REDUCTIONS = ("mean", "sum", "none")


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


def chunk_rows(n: int, v: int, h: int) -> int:
    """Rows per chunk: a power of two with the logits chunk about the size of the hidden states
    (as Liger sizes it), but at least 256 rows, so the three GEMMs per chunk keep their efficiency
    (dW = dlogits^T x has only `rows` as its inner dimension), and at most n.

    Measured on 2 CPU cores at V=128256, H=256: 64-row chunks were 1.2x slower than 256-row ones.
    At V=128256 the floor costs 128 MiB of fp32 logits (CPU) or 64 MiB of bf16 (GPU); at N=32k,
    H=4096 the size rule gives 1024 rows.
    """
    rows = max(256, 1 << max(n * h // max(v, 1), 1).bit_length() - 1)
    return max(1, min(rows, n))


@functools.cache
def _cuda_addmm_out_dtype() -> bool:
    """Whether cuBLAS can add a half-precision product straight into an fp32 tensor (torch>=2.8)."""
    try:  # probed exactly as used: accumulating in place (out aliases the added tensor)
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        acc = torch.ones(2, 2, device="cuda")
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3).all())
    except (RuntimeError, TypeError):
        return False


def _addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in fp32 while a and b may be half precision."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _cuda_addmm_out_dtype():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)  # a (V x H) half-precision temporary per chunk


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
    autocast itself would); dX comes back in hidden's dtype and dW, db in fp32.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    rows = _rows_fn(backend)
    grad = want_x or want_w or want_b
    wc = weight.to(cdtype)
    loss = torch.empty(n, dtype=acc_dtype(cdtype), device=hidden.device)
    lse = torch.empty_like(loss)
    gx = torch.empty_like(hidden) if want_x else None
    gw = torch.zeros(v, h, dtype=acc_dtype(weight.dtype), device=weight.device) if want_w else None
    gb = torch.zeros(v, dtype=acc_dtype(bias.dtype), device=bias.device) if want_b else None
    per_row = scale is not None and scale.dim() == 1
    step = chunk or chunk_rows(n, v, h)
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
            _addmm_acc_(gw, logits.T, xc)
        if want_b:
            gb += logits.sum(0, dtype=gb.dtype)
    return loss, lse, gx, gw, gb


class LinearCrossEntropy(torch.autograd.Function):
    """Chunked linear + cross-entropy; `backend` picks the row function ("torch" or "triton")."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, z_loss, smoothing, chunk, backend,
                cdtype):
        hidden, target = hidden.contiguous(), target.contiguous()
        opts = dict(ignore_index=ignore_index, z_loss=float(z_loss), smoothing=float(smoothing))
        run = dict(cdtype=cdtype, opts=opts, backend=backend, chunk=chunk)
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        ctx.reduction = reduction
        ctx.w_dtype, ctx.b_dtype = weight.dtype, (bias.dtype if bias is not None else None)
        if reduction == "none":  # the per-token upstream gradient is known only in backward: recompute there
            loss, _, _, _, _ = _chunks(hidden, weight, bias, target, **run, scale=None, want_x=False,
                                       want_w=False, want_b=False)
            ctx.save_for_backward(hidden, weight, bias, target)
            ctx.run = run
            return loss
        scale = n_valid = None
        if reduction == "mean":
            n_valid = (target != ignore_index).sum().clamp(min=1).to(acc_dtype(cdtype))  # a tensor: no sync
            scale = 1.0 / n_valid
        loss, _, gx, gw, gb = _chunks(hidden, weight, bias, target, **run, scale=scale, want_x=want_x,
                                      want_w=want_w, want_b=want_b)
        ctx.save_for_backward(gx, gw, gb)  # released after backward, so autograd can adopt them as .grad
        ctx.applied = None
        total = loss.sum()
        return total / n_valid if n_valid is not None else total

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # the GEMM dtype was fixed in forward
            return LinearCrossEntropy._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors  # the parameters themselves, not copies
            want_x, want_w, want_b = ctx.needs_input_grad[:3]
            with gathered(weight, bias):  # ZeRO-3 partitioned them again after forward: one more gather
                _, _, gx, gw, gb = _chunks(hidden, weight, bias, target, **ctx.run,
                                           scale=grad_out.to(acc_dtype(ctx.run["cdtype"])).contiguous(),
                                           want_x=want_x, want_w=want_w, want_b=want_b)
        else:
            gx, gw, gb = ctx.saved_tensors
            grad_out = grad_out.detach()
            if ctx.applied is None:  # in place: dW is as large as the weight, a copy would raise the peak
                for g in (gx, gw, gb):
                    if g is not None:
                        g.data.mul_(grad_out.to(g.dtype))  # .data: ours alone; a retained graph stays usable
                ctx.applied = grad_out.clone()
            else:  # another backward through a retained graph (gradcheck does this): rescale a copy
                if bool(ctx.applied == 0):
                    raise RuntimeError("fused_linear_cross_entropy: a second backward after one with a zero upstream "
                                       "gradient cannot be served (the stored gradients were scaled to 0)")
                r = grad_out / ctx.applied
                gx, gw, gb = (g * r.to(g.dtype) if g is not None else None for g in (gx, gw, gb))
        gw = gw.to(ctx.w_dtype) if gw is not None else None  # fp32 accumulator -> the parameter's dtype
        gb = gb.to(ctx.b_dtype) if gb is not None else None
        return gx, gw, gb, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                               z_loss=0.0, label_smoothing=0.0, impl="auto", chunk_size=None):
    """``CE(hidden @ weight.T + bias, target)`` without the (N x V) logits.

    hidden (N, H), weight (V, H), target (N,) long, bias (V,) or None. Inputs may be fp32, bf16 or
    fp16; the log-sum-exp, the loss and dW accumulate in fp32 and the loss is fp32. Under autocast
    with fp32 inputs the GEMMs run in the autocast dtype (as ``F.linear`` would) while dW still
    accumulates in fp32 and is returned in fp32. ``reduction``:
    "mean" over non-ignored tokens (0 when there are none), "sum", or "none" (per token, 0 at
    ignored ones). ``z_loss`` adds ``z_loss * lse**2`` per non-ignored token; ``label_smoothing``
    is ``F.cross_entropy``'s. ``impl``: "auto" (Triton on CUDA, else the chunked PyTorch path; see
    ``simcot.kernels.dispatch``), "triton", "torch" or "reference" (materialises the logits).
    ``chunk_size``: rows per chunk (default: ``chunk_rows``).
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
            return LinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, reduction, z_loss,
                                            label_smoothing, chunk_size, impl, cdtype)
        # no autograd (eval, no_grad): the loss only; the Function would do gradient work in forward
        loss, _, _, _, _ = _chunks(hidden.contiguous(), weight, bias, target.contiguous(), cdtype=cdtype,
                                   opts=dict(ignore_index=ignore_index, z_loss=float(z_loss),
                                             smoothing=float(label_smoothing)),
                                   backend=impl, chunk=chunk_size, scale=None, want_x=False, want_w=False,
                                   want_b=False)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / (target != ignore_index).sum().clamp(min=1) if reduction == "mean" else total
