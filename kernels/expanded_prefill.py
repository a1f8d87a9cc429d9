"""Causal flash attention for the expanded MLA form (prefill: S close to T).

Math (per batch b, head h):

    [K_nope | V] = c [W_UK ; W_UV]^T          one expansion GEMM over all heads: [B, T, H*(dn+dv)]
    x[i, j]      = (q_nope[i] . K_nope[j] + q_rope[i] . kp[j]) * scale (+ mask[b, i, j])
    x[i, j]      = -inf where the bool mask is False, or j > i (is_causal, top-left aligned)
    out[i]       = sum_j softmax_j(x[i, :]) V[j]                        [B, H, S, dv]

`_expanded_fwd_kernel`, grid (query tiles, B*H): the key is read from two pointers, the per-head
no-RoPE part (a strided view into the expansion GEMM's output; no split copy) and the RoPE key kp
shared by every head (never broadcast into a [B, H, T, dr] copy); the dot product is two tl.dots.
K_nope and V are the two halves of the expansion's rows, read in place through their strides.

Skipping work: with is_causal and no mask, a query tile stops at its diagonal (the upper triangle
is never loaded). With a mask, `block_map` (one read of the mask by (key block, query tile, batch)
programs, then one list per query tile; no host sync, so CUDA graphs can capture it) first lists, per
query tile, the key blocks that hold any allowed entry, each flagged "entirely allowed with zero
bias"; the attention kernel visits only those blocks (so HF's causal-shaped masks skip their dead
triangle) and reads the mask tile only in partially masked blocks. Float entries <= finfo.min / 2 count as masked; a query tile with a row
masked everywhere keeps every block (the reference's uniform-row semantics for float masks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mla_compile.kernels.absorbed_decode import LOG2E, dot_precision, kernel_dtype, mask_view, online_softmax_step
from mla_compile.kernels.common import as_tokens, check_args, check_sinks, launcher

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRET:
    _CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({}, num_warps=8, num_stages=3),
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=3),
    ]


@triton.jit
def _attend_block(acc, m_i, l_i, q, qr, n0, offs_m, m_ok, kn_base, v_base, kr_base, mask_base, need_mask,
                  sm_scale, T, DN, DV, DR, s_kt, s_kd, s_vt, s_vd, s_krt, s_krd, s_mt,
                  BLOCK_N: tl.constexpr, DN_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                  DR_PAD: tl.constexpr, HAS_ROPE: tl.constexpr, MASK_KIND: tl.constexpr,
                  LOAD_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    offs_n = offs_n.to(tl.int64)      # key x token stride (H*(dn+dv) in the expansion) passes 2**31 at long T
    offs_dn = tl.arange(0, DN_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    kn = tl.load(kn_base + offs_n[None, :] * s_kt + offs_dn[:, None] * s_kd,
                 mask=n_ok[None, :] & (offs_dn[:, None] < DN), other=0.0)          # [DN_PAD, BLOCK_N]
    qk = tl.dot(q, kn, input_precision=DOT_PREC)
    if HAS_ROPE:
        offs_dr = tl.arange(0, DR_PAD)
        kr = tl.load(kr_base + offs_n[None, :] * s_krt + offs_dr[:, None] * s_krd,
                     mask=n_ok[None, :] & (offs_dr[:, None] < DR), other=0.0)
        qk += tl.dot(qr, kr, input_precision=DOT_PREC)
    qk = qk * sm_scale
    valid = n_ok[None, :] & m_ok[:, None]
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if LOAD_MASK:
        # need_mask (a runtime flag) 0: the loads are predicated off and read as "allowed" / 0
        # (out-of-range entries stay excluded by `valid`); tl.where, as valid & scalar trips the interpreter
        ld = tl.where(need_mask != 0, valid, False)
        if MASK_KIND == 1:
            mv = tl.load(mask_base + offs_m[:, None] * 0 + offs_n[None, :] * s_mt, mask=ld, other=1)
            valid = valid & (mv != 0)
        if MASK_KIND == 2:
            mv = tl.load(mask_base + offs_n[None, :] * s_mt, mask=ld, other=0.0)
            qk += mv.to(tl.float32)
    qk = tl.where(valid, qk, float("-inf"))
    p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
    v = tl.load(v_base + offs_n[:, None] * s_vt + offs_dv[None, :] * s_vd,
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.autotune(configs=_CONFIGS, key=["DN_PAD", "DV_PAD", "DR_PAD", "MASK_KIND", "IS_CAUSAL", "BLOCK_M",
                                        "BLOCK_N", "DOT_PREC"])
@triton.jit
def _expanded_fwd_kernel(
    Q, QR, KN, V, KR, MASK, LIST, CNT, O, SINK,
    sm_scale, H, S, T, DN, DV, DR, n_mblocks, n_nblocks,
    s_qb, s_qh, s_qs, s_qd,
    s_rb, s_rh, s_rs, s_rd,
    s_kb, s_kh, s_kt, s_kd,
    s_vb, s_vh, s_vt, s_vd,
    s_krb, s_krt, s_krd,
    s_mb, s_ms, s_mt,
    s_ob, s_oh, s_os, s_od,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DN_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DR_PAD: tl.constexpr, HAS_ROPE: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_SINK: tl.constexpr = False,
):
    sm_scale = tl.cast(sm_scale, tl.float32)   # Inductor passes a Python float as an fp64 scalar: keep the tiles' math fp32
    pid_m = n_mblocks - 1 - tl.program_id(0)          # heaviest (causal) query tiles first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    offs_dn = tl.arange(0, DN_PAD)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m.to(tl.int64)[:, None] * s_qs + offs_dn[None, :] * s_qd,
                mask=m_ok[:, None] & (offs_dn[None, :] < DN), other=0.0)
    qr = q
    if HAS_ROPE:
        offs_dr = tl.arange(0, DR_PAD)
        qr = tl.load(QR + b * s_rb + h * s_rh + offs_m.to(tl.int64)[:, None] * s_rs + offs_dr[None, :] * s_rd,
                     mask=m_ok[:, None] & (offs_dr[None, :] < DR), other=0.0)
    kn_base = KN + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    kr_base = KR + b * s_krb
    mask_base = MASK + b * s_mb + offs_m.to(tl.int64)[:, None] * s_ms     # S x T can pass 2**31

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    if MASK_KIND == 0:
        hi = T
        if IS_CAUSAL:
            hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
        for n0 in range(0, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, qr, n0, offs_m, m_ok, kn_base, v_base, kr_base, mask_base, True,
                sm_scale, T, DN, DV, DR, s_kt, s_kd, s_vt, s_vd, s_krt, s_krd, s_mt,
                BLOCK_N, DN_PAD, DV_PAD, DR_PAD, HAS_ROPE, MASK_KIND, False, IS_CAUSAL, DOT_PREC)
    else:
        lbase = (b * n_mblocks + pid_m)
        cnt = tl.load(CNT + lbase * 2)
        pre = tl.load(CNT + lbase * 2 + 1)
        # the leading run of entirely allowed blocks (all of a causal mask's tile but its diagonal): a
        # plain loop, which Triton software-pipelines; then the listed blocks, reading the mask
        for n0 in range(0, pre * BLOCK_N, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, qr, n0, offs_m, m_ok, kn_base, v_base, kr_base, mask_base, True,
                sm_scale, T, DN, DV, DR, s_kt, s_kd, s_vt, s_vd, s_krt, s_krd, s_mt,
                BLOCK_N, DN_PAD, DV_PAD, DR_PAD, HAS_ROPE, MASK_KIND, False, IS_CAUSAL, DOT_PREC)
        for i in range(pre, cnt):
            e = tl.load(LIST + lbase * n_nblocks + i)
            n0 = (e // 2) * BLOCK_N
            # one copy of the block's code for both kinds of listed block: the mask tile is read only
            # where the block is not entirely allowed with zero bias (the flag; the loads predicated off
            # otherwise). Two copies (a branch on the flag) take 2034 against 1755 us at H=128, S=T=4096
            # on an H200 (docs/design.md).
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, qr, n0, offs_m, m_ok, kn_base, v_base, kr_base, mask_base, 1 - e % 2,
                sm_scale, T, DN, DV, DR, s_kt, s_kd, s_vt, s_vd, s_krt, s_krd, s_mt,
                BLOCK_N, DN_PAD, DV_PAD, DR_PAD, HAS_ROPE, MASK_KIND, True, IS_CAUSAL, DOT_PREC)

    if HAS_SINK:
        # the head's sink: one more key in the normaliser, with a zero value (never masked)
        sink = tl.load(SINK + h).to(tl.float32)
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        l_i = l_i * alpha + tl.exp2((sink - m_new) * LOG2E)
        acc = acc * alpha[:, None]
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    offs_dv = tl.arange(0, DV_PAD)
    tl.store(O + b * s_ob + h * s_oh + offs_m.to(tl.int64)[:, None] * s_os + offs_dv[None, :] * s_od,
             o.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))


# --------------------------------------------------------------------------------------------
# launcher


def blocks_for(S: int, T: int) -> tuple[int, int]:
    if INTERPRET:
        return 16, 16
    return (128 if S > 64 else 64), 64


@triton.jit
def _mask_tile(MASK, b, offs_m, m_ok, nb, T, s_mb, s_ms, s_mt, min_half,
               BLOCK_N: tl.constexpr, IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(allowed, free) of one [BLOCK_M, BLOCK_N] mask tile; out-of-range entries are not allowed but
    count as free (the attention kernel masks them by bounds)."""
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = m_ok[:, None] & (offs_n[None, :] < T)
    ptr = MASK + b * s_mb + offs_m.to(tl.int64)[:, None] * s_ms + offs_n[None, :] * s_mt
    if IS_BOOL:
        allowed = tl.load(ptr, mask=inb, other=0) != 0
        free = allowed
    else:
        mv = tl.load(ptr, mask=inb, other=0.0).to(tl.float32)
        allowed = mv > min_half
        free = mv == 0.0
    allowed = allowed & inb
    if IS_CAUSAL:
        tri = offs_n[None, :] <= offs_m[:, None]
        allowed = allowed & tri
        free = free & tri
    return allowed, free | ~inb


@triton.jit
def _block_flags_kernel(
    MASK, FLAGS, ROWANY, S, T, n_mblocks, n_nblocks, s_mb, s_ms, s_mt, min_half,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    # One program per (key block, query tile, batch): the mask is read once, by every SM at once.
    # FLAGS[b, m, n] = 0 dead (no allowed entry), 1 live, 2 live and entirely allowed with zero bias;
    # float masks also mark in ROWANY[b, row] (zeroed by the launcher) the rows with an allowed entry.
    nb = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    allowed, free = _mask_tile(MASK, b, offs_m, m_ok, nb, T, s_mb, s_ms, s_mt, min_half,
                               BLOCK_N, IS_BOOL, IS_CAUSAL)
    row_any = tl.max(allowed.to(tl.int32), 1)
    live = tl.max(row_any, 0)
    all_free = tl.min(tl.min(free.to(tl.int32), 1), 0)
    tl.store(FLAGS + (b * n_mblocks + pid_m) * n_nblocks + nb, (live * (1 + all_free)).to(tl.int8))
    if not IS_BOOL:
        tl.atomic_max(ROWANY + b * S + offs_m, row_any, mask=m_ok & (row_any > 0))


@triton.jit
def _block_list_kernel(
    FLAGS, ROWANY, LIST, CNT, S, n_mblocks, n_nblocks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, IS_BOOL: tl.constexpr,
):
    # One program per (query tile, batch): the live key blocks in order, each 2 * block + (entirely
    # allowed with zero bias), their count, and how many leading blocks 0, 1, ... are live and entirely
    # allowed. A float-masked query row with no allowed entry at all makes its tile keep every block
    # (the reference's uniform-row semantics).
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    keep_all = 0
    if not IS_BOOL:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < S
        row_any = tl.load(ROWANY + b * S + offs_m, mask=m_ok, other=1)
        keep_all = tl.max((m_ok & (row_any == 0)).to(tl.int32), 0)
    base = (b * n_mblocks + pid_m) * n_nblocks
    cnt = 0
    prefix = 0
    open_run = 1          # no dead or partial block seen yet
    for c0 in range(0, n_nblocks, CHUNK):
        offs_n = c0 + tl.arange(0, CHUNK)
        n_ok = offs_n < n_nblocks
        f = tl.load(FLAGS + base + offs_n, mask=n_ok, other=0).to(tl.int32)
        live = (f > 0) & n_ok
        if not IS_BOOL:     # tl.where, not `| scalar`: a tensor-scalar mask trips the interpreter
            live = tl.where(keep_all != 0, n_ok, live)
        li = live.to(tl.int32)
        pos = cnt + tl.cumsum(li, 0) - li
        tl.store(LIST + base + pos, offs_n * 2 + (f == 2).to(tl.int32), mask=live)
        cnt += tl.sum(li, 0)
        # the prefix: up to the first block in the chunk that is not live-and-free, if the run is open
        first_bad = tl.min(tl.where(n_ok & (f != 2), offs_n, n_nblocks), 0)
        prefix = tl.where(open_run != 0, tl.minimum(first_bad, c0 + CHUNK), prefix)
        prefix = tl.minimum(prefix, n_nblocks)
        open_run = open_run & (first_bad >= c0 + CHUNK).to(tl.int32)
    tl.store(CNT + (b * n_mblocks + pid_m) * 2, cnt)
    tl.store(CNT + (b * n_mblocks + pid_m) * 2 + 1, prefix)


def block_map(view, S, T, is_causal, BM, BN, chunk: int | None = None):
    """Live key blocks per query tile of a mask, given as `mask_view`'s (kind, [B, S, T] view, strides):
    (entries [B, nM, nN] int32, the first counts[b, m, 0] of them live, each 2*block + entirely_allowed;
    counts [B, nM, 2] int32: the live count, and how many leading blocks 0, 1, ... are live and
    entirely allowed), built on the device without a host sync: one read of the mask by (key block,
    query tile, batch) programs, then the lists from the per-block flags. (A single kernel per query
    tile walking its row of blocks reads the mask twice with 32 programs: about 400 us at S=T=4096 on an
    H200, against about 22 us for these two launches; docs/design.md.) chunk: blocks a list program
    takes at a time (tests)."""
    kind, m, (s_mb, s_ms, s_mt) = view
    B = m.shape[0]
    nM, nN = triton.cdiv(S, BM), triton.cdiv(T, BN)
    flags = torch.empty(B, nM, nN, dtype=torch.int8, device=m.device)
    # float masks only: rows with an allowed entry (zero-filled: a third launch); unused for bool masks
    row_any = (torch.zeros(B, S, dtype=torch.int32, device=m.device) if kind == 2
               else torch.empty(B, 1, dtype=torch.int32, device=m.device))
    entries = torch.empty(B, nM, nN, dtype=torch.int32, device=m.device)
    counts = torch.empty(B, nM, 2, dtype=torch.int32, device=m.device)
    min_half = float(torch.finfo(m.dtype).min / 2) if kind == 2 else 0.0
    launcher(_block_flags_kernel, m)[(nN, nM, B)](
        m, flags, row_any, S, T, nM, nN, s_mb, s_ms, s_mt, min_half,
        BLOCK_M=BM, BLOCK_N=BN, IS_BOOL=kind == 1, IS_CAUSAL=bool(is_causal), num_warps=4,
    )
    launcher(_block_list_kernel, m)[(nM, B)](
        flags, row_any, entries, counts, S, nM, nN,
        BLOCK_M=BM, CHUNK=chunk or min(1024, max(16, triton.next_power_of_2(nN))), IS_BOOL=kind == 1, num_warps=4,
    )
    return entries, counts


def expansion_weight(w_uk, w_uv):
    """kv_b_proj.weight [H*(dn+dv), r] recovered from its two per-head views without a copy where
    they are the halves of one tensor; else one concatenated copy."""
    H, dn, r = w_uk.shape
    dv = w_uv.shape[1]
    # _is_alias_of and storage offsets, not data pointers: they also answer on a tracer's stand-ins.
    if (w_uk.dtype == w_uv.dtype and w_uk.stride() == ((dn + dv) * r, r, 1) and w_uv.stride() == w_uk.stride()
            and torch._C._is_alias_of(w_uv, w_uk) and w_uv.storage_offset() == w_uk.storage_offset() + dn * r):
        return torch.as_strided(w_uk, (H * (dn + dv), r), (r, 1))
    return torch.cat([w_uk, w_uv], 1).reshape(H * (dn + dv), r)


def expanded_attention(q_nope, q_rope, k_nope, v, k_rope, mask=None, scale=1.0, is_causal=False, out=None,
                       sinks=None):
    """Core: q_nope [B, H, S, dn], q_rope [B, H, S, dr], k_nope [B, H, T, dn] and v [B, H, T, dv] (any
    strides), k_rope [B, T, dr] shared by the heads, sinks None or [H] -> out [B, H, S, dv]."""
    B, H, S, dn = q_nope.shape
    T, dv, dr = k_nope.shape[2], v.shape[3], k_rope.shape[2]
    dt = q_nope.dtype
    if out is None:
        out = torch.empty(B, H, S, dv, dtype=dt, device=q_nope.device)
    if B * H * S == 0:
        return out
    BM, BN = blocks_for(S, T)
    nM, nN = triton.cdiv(S, BM), triton.cdiv(T, BN)
    kind, m, ms = mask_view(mask, B, S, T)
    if kind:
        entries, counts = block_map((kind, m, ms), S, T, is_causal, BM, BN)
    else:
        entries = counts = q_nope
    sink = sinks.to(torch.float32).contiguous() if sinks is not None else out
    launcher(_expanded_fwd_kernel, q_nope)[(nM, B * H)](
        q_nope, q_rope, k_nope, v, k_rope, m if m is not None else q_nope, entries, counts, out, sink,
        float(scale), H, S, T, dn, dv, dr, nM, nN,
        *q_nope.stride(), *q_rope.stride(), *k_nope.stride(), *v.stride(), *k_rope.stride(), *ms,
        *out.stride(),
        BLOCK_M=BM, BLOCK_N=BN, DN_PAD=max(16, triton.next_power_of_2(dn)),
        DV_PAD=max(16, triton.next_power_of_2(dv)), DR_PAD=max(16, triton.next_power_of_2(max(dr, 1))),
        HAS_ROPE=dr > 0, MASK_KIND=kind, IS_CAUSAL=bool(is_causal), DOT_PREC=dot_precision(dt),
        HAS_SINK=sinks is not None,
    )
    return out


def expanded_prefill(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask=None, scale=1.0, is_causal=False,
                     sinks=None):
    """Drop-in for `expanded_reference` (same signature), kernel-backed."""
    d = check_args(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask)
    check_sinks(sinks, d)
    dt = kernel_dtype(q_nope.dtype)
    if dt is None:
        raise TypeError(f"the MLA kernels take float16, bfloat16 or float32, got {q_nope.dtype} "
                        "(kernels.registry.kernel_for sends other dtypes to the reference)")
    B, H, T, dn, dv = d.batch, d.heads, d.kv_len, d.nope_dim, d.v_dim
    c = as_tokens(latent, "latent").to(dt)
    kr = as_tokens(k_rope, "k_rope").to(dt)
    w = expansion_weight(w_uk, w_uv).to(dt)
    kv = torch.matmul(c, w.t()).view(B, T, H, dn + dv)            # the one expansion GEMM
    k_nope = kv[..., :dn].permute(0, 2, 1, 3)                     # [B, H, T, dn] strided views
    v = kv[..., dn:].permute(0, 2, 1, 3)
    out = torch.empty(B, H, d.q_len, dv, dtype=q_nope.dtype, device=q_nope.device)
    return expanded_attention(q_nope, q_rope.to(dt), k_nope, v, kr, mask, scale, is_causal, out=out, sinks=sinks)
