"""Triton row function for the chunked linear cross-entropy (same contract as ``_ce_rows_torch``).

One program per row of a logits chunk: pass 1 streams the row in blocks of BLOCK_V columns and
keeps an online log-sum-exp (running max and rescaled sum, fp32), the target logit and the row
sum (for label smoothing); pass 2 re-reads the row, now cached in L2 for chunk-sized rows, and
overwrites it in place with scale * dloss/dlogits in the logits dtype, so the backward GEMMs read
it directly and no second (chunk x V) buffer exists. The logits GEMMs stay on cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from simcot.kernels.dispatch import next_pow2

MAX_BLOCK_V = 32768  # columns per block (tests lower it to exercise ragged multi-block rows)


@triton.jit
def _ce_rows_kernel(logits_ptr, stride_row, target_ptr, bias_ptr, scale_ptr, loss_ptr, lse_ptr,
                    V, ignore_index, z_loss, smoothing,
                    HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    y = tl.load(target_ptr + row)
    valid = y != ignore_index

    m = -float("inf")  # running max
    d = 0.0  # running sum of exp(z - m)
    z_y = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        z_y += tl.sum(tl.where(cols == y, z, 0.0), 0)
        z_sum += tl.sum(tl.where(mask, z, 0.0), 0)
    lse = m + tl.log(d)
    loss = lse - (1.0 - smoothing) * z_y - smoothing * z_sum / V + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)

    if GRAD:
        g = 1.0
        if SCALE == 1:  # one scale for all rows (1 / number of valid tokens, for "mean")
            g = tl.load(scale_ptr).to(tl.float32)
        if SCALE == 2:  # one per row (the upstream gradient of reduction="none")
            g = tl.load(scale_ptr + row).to(tl.float32)
        g = tl.where(valid, g, 0.0)
        a = g * (1.0 + 2.0 * z_loss * lse)
        off = g * smoothing / V
        hit = g * (1.0 - smoothing)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            dz = a * tl.exp(z - lse) - off - tl.where(cols == y, hit, 0.0)
            tl.store(row_ptr + cols, dz.to(logits_ptr.dtype.element_ty), mask=mask)


def ce_rows_triton(logits, target, bias, loss_out, lse_out, *, ignore_index, z_loss, smoothing, scale, grad):
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton cross-entropy takes fp32/bf16/fp16 logits, not {logits.dtype}")
    c, v = logits.shape
    if c == 0:
        return
    assert logits.stride(1) == 1 and loss_out.is_contiguous() and lse_out.is_contiguous()
    block = min(next_pow2(v), MAX_BLOCK_V)
    mode = 0 if scale is None else (2 if scale.dim() == 1 else 1)
    dummy = loss_out  # never read when the matching constexpr flag is off
    _ce_rows_kernel[(c,)](
        logits, logits.stride(0), target, bias if bias is not None else dummy,
        scale.contiguous() if scale is not None else dummy, loss_out, lse_out,
        v, ignore_index, z_loss, smoothing,
        HAS_BIAS=bias is not None, SCALE=mode, GRAD=bool(grad), BLOCK_V=block,
        num_warps=32 if block >= 16384 else (16 if block >= 4096 else 8 if block >= 1024 else 4),
    )
