"""Sparse (DSA) absorbed attention: each query attends only to its indexer's top-k latent rows.

Math (query (b, s), heads h in the rows of one tile, k selected positions idx[b, s, :]):

    q_lat[h]   = q_nope[b, h, s] W_UK[h]                                  (torch bmm around)
    x[h, n]    = (q_lat[h] . c[b, idx_n] + q_rope[b, h, s] . kp[b, idx_n]) * scale (+ mask[b, s, idx_n])
    x[h, n]    = -inf where idx_n == -1, the bool mask is False there, or idx_n > s (is_causal)
    o_lat[h]   = sum_n softmax_n(x[h, :]) c[b, idx_n]
    out        = o_lat W_UV^T                                             (torch bmm around)

`_sparse_split_kernel`, grid (B*S, splits, head tiles): the latent and RoPE rows are gathered inside
the kernel (one pointer per selected row, each row contiguous), so the work and the bytes read are
O(S * k * (r + dr)) whatever T is: a decode step over 128K tokens costs what one over 8K does.
Splits over the k selected positions (decode, few programs) are merged from their (m, l) pairs by the
merge kernel of `absorbed_decode`. Works for prefill (many queries, one split each) and decode.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mla_compile.kernels.absorbed_decode import (
    SPLIT_CONFIGS, absorb, block_m_for, dot_precision, kernel_dtype, mask_view, merge_splits, num_sms,
    online_softmax_step, project, work_bucket,
)
from mla_compile.kernels.common import as_tokens, check_args, check_indices, check_sinks, launcher

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

@triton.autotune(configs=SPLIT_CONFIGS, key=["H_BUCKET", "WORK", "R_PAD", "DR_PAD", "MASK_KIND", "ONE_SPLIT", "DOT_PREC"])
@triton.jit
def _sparse_split_kernel(
    Q, QR, C, KR, IDX, MASK, O, OP, ML,
    sm_scale, H, S, K, R, DR, chunk, T, MT,
    s_qb, s_qh, s_qs, s_qd,
    s_rb, s_rh, s_rs, s_rd,
    s_cb, s_ct, s_cd,
    s_kb, s_kt, s_kd,
    s_ib, s_is, s_ik,
    s_mb, s_ms, s_mt,
    s_ob, s_oh, s_od,
    s_pb, s_pp,
    H_BUCKET, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DR_PAD: tl.constexpr,
    HAS_ROPE: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    ONE_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # B*S on grid axis 0 (up to 2**31 programs; axes 1 and 2 stop at 65535, too few for prefill).
    sm_scale = tl.cast(sm_scale, tl.float32)   # Inductor passes a Python float as an fp64 scalar: keep the tiles' math fp32
    bs = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    pid_m = tl.program_id(2)
    b = bs // S
    s = bs % S
    h = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    h_ok = h < H
    h = h.to(tl.int64)          # h x head stride passes 2**31 when q_lat is an [H, B*S, r] view (prefill)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R

    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + s * s_qs + offs_r[None, :] * s_qd,
                mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    if HAS_ROPE:
        offs_d = tl.arange(0, DR_PAD)
        d_ok = offs_d < DR
        qr = tl.load(QR + b * s_rb + h[:, None] * s_rh + s * s_rs + offs_d[None, :] * s_rd,
                     mask=h_ok[:, None] & d_ok[None, :], other=0.0)

    start = pid_p * chunk
    stop = tl.minimum(start + chunk, K)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, R_PAD], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        idx = tl.load(IDX + b * s_ib + s * s_is + offs_n * s_ik, mask=n_ok, other=-1).to(tl.int64)
        # Outside [0, T) reads nothing: -1 means "no token"; a larger index can only reach here while a
        # CUDA graph is captured, when the host-side range check cannot read the indices.
        ok = (idx >= 0) & (idx < T)
        if IS_CAUSAL:
            ok = ok & (idx <= s)
        # The mask covers keys [0, MT) (MT = T but for DeepSeek-V4's gathered form, whose mask is the
        # window's alone): a key past it has no mask term.
        if MASK_KIND == 1:
            mv = tl.load(MASK + b * s_mb + s * s_ms + idx * s_mt, mask=ok & (idx < MT), other=1)
            ok = ok & (mv != 0)
        idx = tl.where(ok, idx, 0)
        c = tl.load(C + b * s_cb + idx[:, None] * s_ct + offs_r[None, :] * s_cd,
                    mask=ok[:, None] & r_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(c), input_precision=DOT_PREC)
        if HAS_ROPE:
            kr = tl.load(KR + b * s_kb + idx[:, None] * s_kt + offs_d[None, :] * s_kd,
                         mask=ok[:, None] & d_ok[None, :], other=0.0)
            qk += tl.dot(qr, tl.trans(kr), input_precision=DOT_PREC)
        qk = qk * sm_scale
        if MASK_KIND == 2:
            mv = tl.load(MASK + b * s_mb + s * s_ms + idx * s_mt, mask=ok & (idx < MT), other=0.0)
            qk += mv.to(tl.float32)[None, :]
        qk = tl.where(ok[None, :], qk, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if ONE_SPLIT:
        tl.store(O + bs * s_ob + h[:, None] * s_oh + offs_r[None, :] * s_od,
                 o.to(O.dtype.element_ty), mask=h_ok[:, None] & r_ok[None, :])
    else:
        # (m, l) per row for the merge, kept apart as in absorbed_decode (its docstring says why)
        base = bs * s_pb + pid_p * s_pp
        tl.store(OP + base + h[:, None] * R_PAD + offs_r[None, :], o, mask=h_ok[:, None])
        ml = ML + 2 * (base // R_PAD + h)
        tl.store(ml, m_i, mask=h_ok)
        tl.store(ml + 1, l_i, mask=h_ok)


def sparse_latent_attention(q_lat, q_rope, latent, k_rope, topk_indices, mask=None, scale=1.0,
                            is_causal=False, out=None, num_splits=None, sinks=None, mask_keys=None):
    """Core: q_lat [B, H, S, r] (any strides), q_rope [B, H, S, dr], latent/k_rope [B, (1,) T, *],
    topk_indices [B, S, k] (-1 = none) -> o_lat written into `out`, a [B*S, H, 1, r] view (any strides)
    or a fresh [B*S, H, 1, r] tensor. sinks: optional [H], added to each row's normaliser by the merge
    (a call with sinks always takes the split path). mask_keys: the mask covers keys [0, mask_keys)
    only (broadcastable to [B, 1, S, mask_keys]); keys past it are unmasked (None: all T keys)."""
    B, H, S, r = q_lat.shape
    c = as_tokens(latent, "latent")
    kr = as_tokens(k_rope, "k_rope")
    T, dr = c.shape[1], kr.shape[2]
    k = topk_indices.shape[2]
    dt = q_lat.dtype
    c, kr, q_rope = c.to(dt), kr.to(dt), q_rope.to(dt)
    if out is None:
        out = torch.empty(B * S, H, 1, r, dtype=dt, device=q_lat.device)
    if B * H * S == 0:
        return out
    if k == 0:
        out.zero_()
        return out
    BLOCK_M = block_m_for(H)
    tiles = triton.cdiv(H, BLOCK_M)
    if num_splits is None:
        want = max(1, round(num_sms(q_lat.device) * max(1, 64 // (2 * BLOCK_M) * 2) / (B * S * tiles)))
    else:
        want = num_splits
    chunk = max(64, triton.cdiv(triton.cdiv(k, want), 64) * 64)
    splits = triton.cdiv(k, chunk)
    MT = T if mask_keys is None else mask_keys
    kind, m, ms = mask_view(mask, B, S, MT)
    R_PAD = max(16, triton.next_power_of_2(r))   # tl.dot needs K >= 16 on the GPU
    DR_PAD = max(16, triton.next_power_of_2(dr)) if dr else 16
    one = splits == 1 and sinks is None
    if one:
        o_part = ml = out
        sp = (0, 0)
    else:
        o_part = torch.empty(B * S, splits, H, R_PAD, dtype=torch.float32, device=q_lat.device)
        ml = torch.empty(B * S, splits, H, 2, dtype=torch.float32, device=q_lat.device)   # (m_p, l_p) per row
        sp = (o_part.stride(0), o_part.stride(1))
    launcher(_sparse_split_kernel, q_lat)[(B * S, splits, tiles)](
        q_lat, q_rope, c, kr, topk_indices, m if m is not None else c, out, o_part, ml,
        float(scale), H, S, k, r, dr, chunk, T, MT,
        *q_lat.stride(), *q_rope.stride(), *c.stride(), *kr.stride(), *topk_indices.stride(), *ms,
        out.stride(0), out.stride(1), out.stride(3), *sp,
        triton.next_power_of_2(H), work_bucket(B * S * k),
        BLOCK_M=BLOCK_M, R_PAD=R_PAD, DR_PAD=DR_PAD, HAS_ROPE=dr > 0, MASK_KIND=kind,
        IS_CAUSAL=bool(is_causal), ONE_SPLIT=one, DOT_PREC=dot_precision(dt),
    )
    if not one:
        merge_splits(o_part, ml, out, 1, r, splits, sinks=sinks)
    return out


def sparse_absorbed_decode(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask=None, scale=1.0,
                           is_causal=False, sinks=None):
    """Drop-in for `sparse_absorbed_reference` (same signature), kernel-backed."""
    d = check_args(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask)
    check_indices(topk_indices, d)
    check_sinks(sinks, d)
    dt = kernel_dtype(q_nope.dtype)
    if dt is None:
        raise TypeError(f"the MLA kernels take float16, bfloat16 or float32, got {q_nope.dtype} "
                        "(kernels.registry.kernel_for sends other dtypes to the reference)")
    B, H, S = d.batch, d.heads, d.q_len
    q_lat = absorb(q_nope, w_uk, dt)
    o_lat = torch.empty(H, B * S, d.rank, dtype=dt, device=q_nope.device)
    sparse_latent_attention(q_lat, q_rope, latent, k_rope, topk_indices, mask, scale, is_causal,
                            out=o_lat.permute(1, 0, 2).unsqueeze(2), sinks=sinks)
    return project(o_lat, w_uv, B, S, q_nope.dtype)


def gathered_window_attention(q, kv, mask, topk_indices, scale=1.0, sinks=None):
    """DeepSeek-V4's CSA attention over one shared head (`passes/forms/latent_mqa.py`'s gathered form):
    q [B, H, S, D], kv [B, 1, T, D] = the W window keys then the C = T - W compressed entries, mask
    broadcastable to [B, 1, S, W] (the window's), topk_indices [B, S, k] into the compressed entries
    (-1 = none) -> [B, H, S, D] in q's dtype. One softmax (with the sinks) over the window keys and the
    selected entries: the kernel above runs over per-query positions [0 .. W) followed by W + idx,
    with the mask read for the window positions only and zero-wide RoPE parts. The caller checks the
    arguments (`check_latent_mqa_gathered`)."""
    B, H, S, D = q.shape
    c = as_tokens(kv, "kv")
    T, W = c.shape[1], mask.shape[-1]
    window = torch.arange(W, device=q.device, dtype=torch.int32).expand(B, S, W)
    picked = torch.where(topk_indices >= 0, topk_indices + W, -1).to(torch.int32)
    idx = torch.cat([window, picked], dim=-1)
    out = sparse_latent_attention(q, q.new_empty(B, H, S, 0), c, c.new_empty(B, T, 0), idx, mask, scale, False,
                                  sinks=sinks, mask_keys=W)
    return out.view(B, S, H, D).transpose(1, 2)
