"""Triton kernels for the latent-feedback epilogue (same contract as ``epilogue_*_torch``).

One program per row, the whole row in one block (H <= 16k). A row's "thinking" flag becomes a
column limit (H or 0) instead of a branch or a mask AND, so the latent branch reads nothing on
token rows and the embedding gather reads nothing on thinking rows (whose ids may be invalid).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from simcot.kernels.dispatch import next_pow2


@triton.jit
def _feedback_fwd_kernel(u_ptr, b2_ptr, nw_ptr, nb_ptr, think_ptr, ids_ptr, emb_ptr, out_ptr, mean_ptr, rstd_ptr,
                         H, eps,
                         HAS_B2: tl.constexpr, HAS_NORM: tl.constexpr, HAS_NB: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    t = tl.load(think_ptr + row).to(tl.int32)  # 1: latent row, 0: token row
    lat = cols < H * t
    tok = cols < H * (1 - t)
    inside = cols < H
    v = tl.load(u_ptr + row.to(tl.int64) * H + cols, mask=lat, other=0.0).to(tl.float32)
    if HAS_B2:
        v += tl.load(b2_ptr + cols, mask=lat, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(v, 0) / H
        xc = tl.where(inside, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / H + eps)
        v = xc * rstd * tl.load(nw_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_NB:
            v += tl.load(nb_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
    tok_id = tl.load(ids_ptr + row).to(tl.int64)
    e = tl.load(emb_ptr + tok_id * H + cols, mask=tok, other=0.0)
    out = tl.where(t != 0, v.to(emb_ptr.dtype.element_ty), e)
    tl.store(out_ptr + row.to(tl.int64) * H + cols, out, mask=inside)


@triton.jit
def _feedback_bwd_kernel(dy_ptr, u_ptr, b2_ptr, nw_ptr, mean_ptr, rstd_ptr, think_ptr, ids_ptr,
                         du_ptr, dnw_rows_ptr, dnb_rows_ptr, de_ptr, H,
                         HAS_B2: tl.constexpr, HAS_NORM: tl.constexpr, EMB: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    t = tl.load(think_ptr + row).to(tl.int32)
    lat = cols < H * t
    tok = cols < H * (1 - t)
    inside = cols < H
    offs = row.to(tl.int64) * H + cols
    g = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    gl = tl.where(lat, g, 0.0)  # the latent branch sees only thinking rows' grads
    if HAS_NORM:
        v = tl.load(u_ptr + offs, mask=lat, other=0.0).to(tl.float32)
        if HAS_B2:
            v += tl.load(b2_ptr + cols, mask=lat, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(lat, (v - mean) * rstd, 0.0)
        gx = gl * tl.load(nw_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        dv = rstd * (gx - tl.sum(gx, 0) / H - xhat * (tl.sum(gx * xhat, 0) / H))
        tl.store(dnw_rows_ptr + offs, gl * xhat, mask=inside)  # summed over rows by the caller
        tl.store(dnb_rows_ptr + offs, gl, mask=inside)
    else:
        dv = gl
    tl.store(du_ptr + offs, tl.where(lat, dv, 0.0), mask=inside)
    if EMB == 1:  # fp32 embedding: scatter-add straight into its gradient
        tok_id = tl.load(ids_ptr + row).to(tl.int64)
        tl.atomic_add(de_ptr + tok_id * H + cols, g, mask=tok)
    if EMB == 2:  # half embedding (no portable half atomics): the token rows' grads, index_add_ by the caller
        tl.store(de_ptr + offs, tl.where(tok, g, 0.0), mask=inside)


def _warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def epilogue_fwd_triton(u, b2, nw, nb, thinking, token_ids, embedding, eps, has_norm):
    b, h = u.shape
    block = next_pow2(h)
    out = torch.empty(b, h, dtype=embedding.dtype, device=u.device)
    mean = torch.empty(b, dtype=torch.float32, device=u.device) if has_norm else None
    rstd = torch.empty_like(mean) if has_norm else None
    dummy = out
    if b:
        _feedback_fwd_kernel[(b,)](
            u, b2 if b2 is not None else dummy, nw if has_norm else dummy, nb if nb is not None else dummy,
            thinking.view(torch.uint8), token_ids, embedding.contiguous(), out,
            mean if has_norm else dummy, rstd if has_norm else dummy, h, eps,
            HAS_B2=b2 is not None, HAS_NORM=has_norm, HAS_NB=nb is not None, BLOCK_H=block, num_warps=_warps(block))
    return out, mean, rstd


def epilogue_bwd_triton(dy, u, b2, nw, mean, rstd, thinking, token_ids, emb_shape, emb_dtype, has_norm, want_emb):
    b, h = u.shape
    block = next_pow2(h)
    f32 = dict(dtype=torch.float32, device=u.device)
    du = torch.empty(b, h, **f32)
    dnw_rows = torch.empty(b, h, **f32) if has_norm else None
    dnb_rows = torch.empty(b, h, **f32) if has_norm else None
    emb = 0 if not want_emb else (1 if emb_dtype == torch.float32 else 2)
    de = torch.zeros(emb_shape, **f32) if emb == 1 else (torch.empty(b, h, **f32) if emb == 2 else None)
    dummy = du
    if b:
        _feedback_bwd_kernel[(b,)](
            dy, u, b2 if b2 is not None else dummy, nw if has_norm else dummy, mean if has_norm else dummy,
            rstd if has_norm else dummy, thinking.view(torch.uint8), token_ids,
            du, dnw_rows if has_norm else dummy, dnb_rows if has_norm else dummy, de if emb else dummy, h,
            HAS_B2=b2 is not None, HAS_NORM=has_norm, EMB=emb, BLOCK_H=block, num_warps=_warps(block))
    if emb == 2:
        rows = de.to(emb_dtype)
        de = torch.zeros(emb_shape, dtype=emb_dtype, device=u.device)
        de.index_add_(0, torch.where(thinking, 0, token_ids), rows)
    dnw = dnw_rows.sum(0) if has_norm else None
    dnb = dnb_rows.sum(0) if has_norm else None
    return du, dnw, dnb, de
