"""The latent-feedback step of the batched rollout: what each sequence feeds back as its next input.

    out[b] = norm(proj(hidden[b]))  if thinking[b]  else  embedding[token_ids[b]]

Coconut feeds the last hidden state back as is (proj = norm = None); CODI first maps it through
Linear -> GELU -> Linear -> LayerNorm. Rows that are not thinking take their token's embedding.

What is fused, and why: the two GEMMs stay on cuBLAS (``F.linear``; the first one's bias rides in
the GEMM, GELU is one elementwise op). Everything after the second GEMM is one row-wise kernel:
its bias, the LayerNorm, the embedding-row gather and the per-row select, and in backward one
kernel for the LayerNorm backward, the select's mask and the scatter-add of the token rows' grads
into the embedding gradient. Unfused, that tail is ~4 kernels forward and ~7 backward
(layer_norm, embedding, where; their backwards, including the index sort of the dense embedding
backward); at rollout sizes (B <= a few hundred rows) each is launch-bound, and the step runs once
per latent thought, so the launch count is the latency. The op computes the latent branch for
every row (no host sync to find the thinking ones) and masks.

Gradients: hidden, w1, b1, w2, b2, norm weight/bias get the thinking rows' contributions only;
the embedding gets the non-thinking rows' grads at their token ids, every other row exactly 0.
That embedding gradient is dense (V x H, as ``nn.Embedding``'s): a sparse COO gradient of the B
rows would skip the zero-fill but breaks the autograd contract callers rely on (gradcheck rejects
its layout; a sparse ``.grad`` fails in AdamW, ``clip_grad_norm_`` and DeepSpeed whenever this op
is the weight's only user). So it is made only when asked for: with ``embedding`` not requiring
grad (the rollout passes it detached: its token rows are masked pad slots, see
``simcot.models.rollout.feed_back``) the backward has no embedding branch and allocates nothing V x H.
Dtypes: the epilogue computes in fp32 (fp64 for fp64 inputs) and returns ``embedding.dtype``, the
dtype the model's own embedding layer would feed it; the GEMMs follow autocast like ``F.linear``.
Under ZeRO-3 the caller gathers the parameters it passes (``simcot.kernels.gathered``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simcot.kernels.dispatch import resolve


def latent_feedback_reference(hidden, thinking, token_ids, embedding, *, proj=None, norm=None):
    """The unfused definition, in plain PyTorch ops with autograd."""
    lat = hidden
    if proj is not None:
        w1, b1, w2, b2 = proj
        lat = F.linear(F.gelu(F.linear(lat, w1, b1)), w2, b2)
    if norm is not None:
        nw, nb, eps = norm
        lat = F.layer_norm(lat, (lat.shape[-1],), nw, nb, eps)
    tok = F.embedding(torch.where(thinking, 0, token_ids), embedding)  # thinking rows' ids may be anything
    return torch.where(thinking[:, None], lat.to(tok.dtype), tok)


# ------------------------------------------------------ the epilogue, in PyTorch (CPU, no Triton)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def epilogue_fwd_torch(u, b2, nw, nb, thinking, token_ids, embedding, eps, has_norm):
    """(out, mean, rstd): out in embedding.dtype, mean/rstd (B,) for the LayerNorm backward."""
    v = u.to(_acc(u.dtype))
    if b2 is not None:
        v = v + b2.to(v.dtype)
    mean = rstd = None
    if has_norm:
        mean = v.mean(1)
        xc = v - mean[:, None]
        rstd = torch.rsqrt((xc * xc).mean(1) + eps)
        v = xc * rstd[:, None] * nw.to(v.dtype)
        if nb is not None:
            v = v + nb.to(v.dtype)
    tok = embedding[torch.where(thinking, 0, token_ids)]
    return torch.where(thinking[:, None], v.to(embedding.dtype), tok), mean, rstd


def epilogue_bwd_torch(dy, u, b2, nw, mean, rstd, thinking, token_ids, emb_shape, emb_dtype, has_norm, want_emb):
    """(du fp32, dnw_rows-summed, dnb, dE): du is zero on token rows, dE on thinking rows' ids."""
    t = thinking[:, None]
    acc = _acc(u.dtype)
    g = dy.to(acc)
    dnw = dnb = None
    if has_norm:
        v = u.to(acc)
        if b2 is not None:
            v = v + b2.to(acc)
        xhat = (v - mean[:, None]) * rstd[:, None]
        gx = g * nw.to(acc)
        dv = rstd[:, None] * (gx - gx.mean(1, keepdim=True) - xhat * (gx * xhat).mean(1, keepdim=True))
        dnw = torch.where(t, g * xhat, 0.0).sum(0)
        dnb = torch.where(t, g, 0.0).sum(0)
    else:
        dv = g
    du = torch.where(t, dv, 0.0)
    de = None
    if want_emb:
        de = torch.zeros(emb_shape, dtype=emb_dtype, device=dy.device)
        de.index_add_(0, torch.where(thinking, 0, token_ids), torch.where(t, 0.0, dy).to(emb_dtype))
    return du, dnw, dnb, de


def _backend(name: str):
    if name == "triton":
        from simcot.kernels import latent_feedback_triton as T

        return T.epilogue_fwd_triton, T.epilogue_bwd_triton
    return epilogue_fwd_torch, epilogue_bwd_torch


class FeedbackEpilogue(torch.autograd.Function):
    """bias + LayerNorm + select-with-embedding-gather on (B, H) rows, with a hand-written backward."""

    @staticmethod
    def forward(ctx, u, b2, nw, nb, thinking, token_ids, embedding, eps, has_norm, backend):
        fwd, _ = _backend(backend)
        u, thinking, token_ids = u.contiguous(), thinking.contiguous(), token_ids.contiguous()
        out, mean, rstd = fwd(u, b2, nw, nb, thinking, token_ids, embedding, eps, has_norm)
        ctx.save_for_backward(u, b2, nw, mean, rstd, thinking, token_ids)
        ctx.has_norm, ctx.backend = has_norm, backend
        ctx.emb_shape, ctx.emb_dtype = embedding.shape, embedding.dtype
        ctx.dtypes = [t.dtype if t is not None else None for t in (b2, nw, nb)]
        return out

    @staticmethod
    def backward(ctx, dy):
        _, bwd = _backend(ctx.backend)
        u, b2, nw, mean, rstd, thinking, token_ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        du, dnw, dnb, de = bwd(dy.contiguous(), u, b2, nw, mean, rstd, thinking, token_ids, ctx.emb_shape,
                               ctx.emb_dtype, ctx.has_norm, need[6])
        db2 = du.sum(0).to(ctx.dtypes[0]) if need[1] else None
        dnw = dnw.to(ctx.dtypes[1]) if need[2] else None
        dnb = dnb.to(ctx.dtypes[2]) if need[3] else None
        return du.to(u.dtype) if need[0] else None, db2, dnw, dnb, None, None, de, None, None, None


def latent_feedback(hidden, thinking, token_ids, embedding, *, proj=None, norm=None, impl="auto"):
    """The next input embedding of each sequence of the rollout, (B, H) in ``embedding.dtype``.

    hidden (B, H) last hidden states; thinking (B,) bool; token_ids (B,) long (ignored where
    thinking); embedding (V, H). proj: None or (w1 (P, H), b1 (P,), w2 (H, P), b2 (H,)) for
    ``gelu(h @ w1.T + b1) @ w2.T + b2`` (exact-erf GELU); norm: None or (weight (H,), bias (H,)
    or None, eps), a LayerNorm after proj. ``impl``: "auto" (Triton epilogue on CUDA, PyTorch
    epilogue otherwise), "triton", "torch", "reference" (the unfused ops).
    """
    if hidden.dim() != 2 or thinking.shape != hidden.shape[:1] or token_ids.shape != hidden.shape[:1] \
            or embedding.dim() != 2 or embedding.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden (B, H), thinking (B,), token_ids (B,), embedding (V, H); got "
                         f"{tuple(hidden.shape)}, {tuple(thinking.shape)}, {tuple(token_ids.shape)}, "
                         f"{tuple(embedding.shape)}")
    if thinking.dtype != torch.bool:
        raise TypeError(f"thinking must be a bool tensor, got {thinking.dtype}")
    impl = resolve(impl, hidden.device)
    if impl == "reference":
        return latent_feedback_reference(hidden, thinking, token_ids, embedding, proj=proj, norm=norm)
    u, b2 = hidden, None
    if proj is not None:
        w1, b1, w2, b2 = proj
        u = F.linear(F.gelu(F.linear(hidden, w1, b1)), w2)  # cuBLAS; b2 goes to the fused epilogue
    nw, nb, eps = norm if norm is not None else (None, None, 0.0)
    if norm is not None and nw is None:
        raise ValueError("norm=(weight, bias, eps) needs a weight")
    args = (u, b2, nw, nb, thinking, token_ids, embedding, float(eps), norm is not None)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, b2, nw, nb, embedding)):
        return FeedbackEpilogue.apply(*args, impl)
    fwd, _ = _backend(impl)  # evaluation rollout: no autograd bookkeeping
    return fwd(u.contiguous(), b2, nw, nb, thinking.contiguous(), token_ids.contiguous(), embedding, *args[7:])[0]
