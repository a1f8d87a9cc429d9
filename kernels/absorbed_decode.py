"""Split-KV ("flash-decoding") attention over the latent cache, for the absorbed MLA form.

Math (per batch b; rows i = (head h, query s) folded together, M = H * S rows):

    q_lat[i]  = q_nope[b, h, s] W_UK[h]                       (torch bmm around the kernel)
    x[i, j]   = (q_lat[i] . c[b, j] + q_rope[b, h, s] . kp[b, j]) * scale  (+ mask[b, s, j])
    x[i, j]   = -inf where the bool mask is False, where j > s (is_causal) or j >= kv_len[b]
    o_lat[i]  = sum_j softmax_j(x[i, :]) c[b, j]              (r-wide; the latent is the value)
    out       = o_lat W_UV^T                                  (torch bmm around the kernel)

Kernel 1 (`_absorbed_split_kernel`), grid (row tiles, splits, B): each program takes BLOCK_M rows
and one contiguous chunk of keys, streams the latent tile c[j0:j0+BLOCK_N, :r] and the RoPE tile
kp[j0:j0+BLOCK_N, :dr] from their own pointers (no concatenated copy), and keeps the online-softmax
state (running max m, sum l, accumulator acc [BLOCK_M, r] in fp32). The latent tile is loaded once
and used twice: as the key (q_lat c^T) and as the value (P c). With one split it writes the
normalised o_lat directly; otherwise it writes o_p = acc / l and the pair (m_p, l_p) per split.

Kernel 2 (`_merge_splits_kernel`), grid (B * rows, r / RB): with M = max_p m_p over the splits with
l_p > 0 and w_p = l_p exp(m_p - M), o = sum_p w_p o_p / sum_p w_p; a row whose every key is masked
gives zeros (as the reference does). m and l are kept apart, not folded into lse_p = m_p + log(l_p):
under HF's float mask a row masked everywhere has m_p = finfo.min (~ -3.4e38) in every split, where
log(l_p) is far below fp32's ulp, so lse_p would lose l_p and weigh splits of unequal key counts alike.

`absorbed_latent_attention` is the core (absorbed q given; optional kv_lens int32 [B] so a static
cache of 64K holding 3K reads 3K); `absorbed_decode` has the reference's signature.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mla_compile.kernels import absorbed_decode_keys_major as keys_major
from mla_compile.kernels import absorbed_decode_seesaw as seesaw
from mla_compile.kernels import common, head_projection, registry, sm90
from mla_compile.kernels.common import as_tokens, check_args, check_sinks, is_traced, launcher

LOG2E = tl.constexpr(common.LOG2E)    # exp(x) = exp2(x * LOG2E)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# the split kernels' autotuning space (the absorbed and the sparse one)
if INTERPRET:
    SPLIT_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
else:
    SPLIT_CONFIGS = [
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=4),
    ]


@triton.jit
def online_softmax_step(qk, m_i, l_i):
    """One key block of the online softmax: scores qk [M, N] in natural units (-inf where masked), the
    running max m_i and sum l_i -> (p, alpha, m_new, l_new). A row that has seen only -inf keeps
    m = -inf and p = 0 (m_safe); the difference is taken before scaling by log2(e), since HF's
    finfo.min * log2(e) overflows fp32. Shared by the Triton kernels (split, sparse, prefill)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_safe) * LOG2E)
    p = tl.exp2((qk - m_safe[:, None]) * LOG2E)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.autotune(configs=SPLIT_CONFIGS, key=["M_BUCKET", "WORK", "R_PAD", "DR_PAD", "MASK_KIND", "ONE_SPLIT", "DOT_PREC"])
@triton.jit
def _absorbed_split_kernel(
    Q, QR, C, KR, MASK, KVLEN, O, OP, ML,
    sm_scale, M, S, T, R, DR, chunk,
    s_qb, s_qh, s_qs, s_qd,
    s_rb, s_rh, s_rs, s_rd,
    s_cb, s_ct, s_cd,
    s_kb, s_kt, s_kd,
    s_mb, s_ms, s_mt,
    s_ob, s_oh, s_os, s_od,
    s_pb, s_pp, s_pm,
    M_BUCKET, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DR_PAD: tl.constexpr,
    HAS_ROPE: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr,
    ONE_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    sm_scale = tl.cast(sm_scale, tl.float32)   # Inductor passes a Python float as an fp64 scalar: keep the tiles' math fp32
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1).to(tl.int64)     # split index x split stride can pass 2**31 (large B*H*S)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    h = (rows // S).to(tl.int64)    # h x head stride passes 2**31 when q_lat is an [H, B*S, r] view
    s = (rows % S).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R

    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + s[:, None] * s_qs + offs_r[None, :] * s_qd,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    if HAS_ROPE:
        offs_d = tl.arange(0, DR_PAD)
        d_ok = offs_d < DR
        qr = tl.load(QR + b * s_rb + h[:, None] * s_rh + s[:, None] * s_rs + offs_d[None, :] * s_rd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    t_end = T
    if HAS_KVLEN:
        t_end = tl.minimum(t_end, tl.load(KVLEN + b))
    if IS_CAUSAL:
        t_end = tl.minimum(t_end, S)          # no row sees a key past the last query position
    start = pid_p * chunk
    stop = tl.minimum(start + chunk, t_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, R_PAD], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        c = tl.load(C + b * s_cb + offs_n[:, None] * s_ct + offs_r[None, :] * s_cd,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(c), input_precision=DOT_PREC)
        if HAS_ROPE:
            kr = tl.load(KR + b * s_kb + offs_n[:, None] * s_kt + offs_d[None, :] * s_kd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            qk += tl.dot(qr, tl.trans(kr), input_precision=DOT_PREC)
        qk = qk * sm_scale
        valid = n_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= s[:, None])
        if MASK_KIND == 1:
            mv = tl.load(MASK + b * s_mb + s[:, None] * s_ms + offs_n[None, :] * s_mt,
                         mask=valid, other=0)
            valid = valid & (mv != 0)
        if MASK_KIND == 2:
            mv = tl.load(MASK + b * s_mb + s[:, None] * s_ms + offs_n[None, :] * s_mt,
                         mask=valid, other=0.0)
            qk += mv.to(tl.float32)
        qk = tl.where(valid, qk, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if ONE_SPLIT:
        tl.store(O + b * s_ob + h[:, None] * s_oh + s[:, None] * s_os + offs_r[None, :] * s_od,
                 o.to(O.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])
    else:
        # ML [B, P, M, 2]: (m, l) per row; an empty split (or a bool-masked row) leaves m = -inf, l = 0.
        base = b * s_pb + pid_p * s_pp
        tl.store(OP + base + rows[:, None] * R_PAD + offs_r[None, :], o, mask=row_ok[:, None])
        ml = ML + 2 * (base // R_PAD + rows)
        tl.store(ml, m_i, mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    OP, ML, O, SINK, S, R, P, M,
    s_pb, s_pp,
    s_ob, s_oh, s_os, s_od,
    R_PAD: tl.constexpr, RB: tl.constexpr, PB: tl.constexpr, ONE_PASS: tl.constexpr = False,
    HAS_SINK: tl.constexpr = False,
):
    # One flat axis over (batch, row): either alone can pass the 65535 limit of grid axes 1 and 2.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // M
    row = pid % M
    offs_r = tl.program_id(1) * RB + tl.arange(0, RB)
    h = row // S
    s = row % S
    # ML [B, P, M, 2] fp32: (m_p, l_p) of row `row` in split p at 2 * ((b * P + p) * M + row)
    ml_base = ML + 2 * ((b * s_pb) // R_PAD + row)
    ml_pp = 2 * (s_pp // R_PAD)
    if ONE_PASS:
        # All splits in one block (P <= PB): (m_p, l_p) and the split outputs are loaded together, one
        # round of memory latency where the two passes below take two (the merge of a small point is
        # latency, not bytes).
        offs_p = tl.arange(0, PB).to(tl.int64)
        p_ok = offs_p < P
        m_p = tl.load(ml_base + offs_p * ml_pp, mask=p_ok, other=float("-inf"))
        l_p = tl.load(ml_base + offs_p * ml_pp + 1, mask=p_ok, other=0.0)
        o = tl.load(OP + b * s_pb + offs_p[:, None] * s_pp + row * R_PAD + offs_r[None, :], mask=p_ok[:, None],
                    other=0.0)
        has = l_p > 0
        m = tl.max(tl.where(has, m_p, float("-inf")), 0)
        if HAS_SINK:
            sink = tl.load(SINK + h).to(tl.float32)
            m = tl.maximum(m, sink)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.where(has, l_p * tl.exp(tl.where(has, m_p, m) - m), 0.0)
        tot = tl.sum(w, 0)
        if HAS_SINK:      # the sink: one more key in the normaliser, with a zero value
            tot += tl.exp(sink - m)
        tot = tl.where(tot > 0, tot, 1.0)
        tl.store(O + b * s_ob + h * s_oh + s * s_os + offs_r * s_od,
                 (tl.sum(w[:, None] * o, 0) / tot).to(O.dtype.element_ty), mask=offs_r < R)
    else:
        # pass 1: the largest m_p over the splits that saw a key (l_p > 0)
        mx = tl.full([PB], float("-inf"), tl.float32)
        for p0 in range(0, P, PB):
            offs_p = (p0 + tl.arange(0, PB)).to(tl.int64)
            p_ok = offs_p < P
            m_p = tl.load(ml_base + offs_p * ml_pp, mask=p_ok, other=float("-inf"))
            l_p = tl.load(ml_base + offs_p * ml_pp + 1, mask=p_ok, other=0.0)
            mx = tl.maximum(mx, tl.where(l_p > 0, m_p, float("-inf")))
        m = tl.max(mx, 0)
        if HAS_SINK:
            sink = tl.load(SINK + h).to(tl.float32)
            m = tl.maximum(m, sink)
        m = tl.where(m == float("-inf"), 0.0, m)
        # pass 2: weights w_p = l_p exp(m_p - m) (0 for an empty split) and the weighted sum of the
        # (normalised) split outputs, PB splits at a time
        total = tl.zeros([PB], tl.float32)
        acc = tl.zeros([RB], tl.float32)
        for p0 in range(0, P, PB):
            offs_p = (p0 + tl.arange(0, PB)).to(tl.int64)
            p_ok = offs_p < P
            m_p = tl.load(ml_base + offs_p * ml_pp, mask=p_ok, other=float("-inf"))
            l_p = tl.load(ml_base + offs_p * ml_pp + 1, mask=p_ok, other=0.0)
            has = l_p > 0
            w = tl.where(has, l_p * tl.exp(tl.where(has, m_p, m) - m), 0.0)
            total += w
            o = tl.load(OP + b * s_pb + offs_p[:, None] * s_pp + row * R_PAD + offs_r[None, :], mask=p_ok[:, None],
                        other=0.0)
            acc += tl.sum(w[:, None] * o, 0)
        tot = tl.sum(total, 0)
        if HAS_SINK:
            tot += tl.exp(sink - m)
        tot = tl.where(tot > 0, tot, 1.0)
        tl.store(O + b * s_ob + h * s_oh + s * s_os + offs_r * s_od, (acc / tot).to(O.dtype.element_ty),
                 mask=offs_r < R)


# --------------------------------------------------------------------------------------------
# launchers


_SM_COUNT: dict = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def work_bucket(n: int) -> int:
    """Autotuning key for the amount of work (keys x batch): a power of two in [2^12, 2^22]."""
    return min(1 << 22, max(1 << 12, triton.next_power_of_2(max(n, 1))))


def kernel_dtype(dtype: torch.dtype):
    """The dtype the kernels compute in (fp32 accumulation always), or None for the reference (fp64)."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else None


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def block_m_for(rows: int) -> int:
    if INTERPRET:
        return 16
    return 64 if rows > 32 else (32 if rows > 16 else 16)


def mask_view(mask, B: int, S: int, T: int):
    """mask broadcastable to [B, 1, S, T] -> (kind, tensor, (stride_b, stride_s, stride_t)), no copy."""
    if mask is None:
        return 0, None, (0, 0, 0)
    if type(mask) is torch.Tensor and not mask.is_meta and mask.dim() == 4:
        view = _plain_mask_view(mask, B, S, T)
        if view is not None:
            return view
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, 1, S, T)[:, 0]
    if m.dtype == torch.bool:
        # Eager launches read it as bytes (a free view); a traced launch passes the bool tensor as is
        # (Triton loads *i1), since Inductor cannot lower a dtype view of a bool tensor.
        m = m if is_traced(m) else m.view(torch.uint8)
        kind = 1
    else:
        kind = 2
    return kind, m, (m.stride(0), m.stride(1), m.stride(2))


def _plain_mask_view(mask, B: int, S: int, T: int):
    """`mask_view` of a 4-D mask of real data (HF's [B, 1, S, T] decode mask) in one as_strided view:
    the sizes and strides that expand(B, 1, S, T)[:, 0] gives (a size-1 dim expanded gets stride 0, a
    dim at its target size keeps its stride), without the three views that build it (host time, at
    every call). None where the mask does not expand (the general path raises torch's error)."""
    b, h, s, t = mask.shape
    if h != 1 or not (b == B or b == 1) or not (s == S or s == 1) or not (t == T or t == 1):
        return None
    sb, _, ss, st = mask.stride()
    strides = (sb if b == B else 0, ss if s == S else 0, st if t == T else 0)
    if mask.dtype == torch.bool:
        return 1, mask.view(torch.uint8).as_strided((B, S, T), strides), strides
    return 2, mask.as_strided((B, S, T), strides), strides


def choose_splits(device, B: int, row_tiles: int, T: int, block_m: int = 64, floor: int = 256) -> tuple[int, int]:
    """(splits, chunk): enough programs to fill the GPU (one 64-row program per SM, two smaller ones,
    which are memory-bound and need more loads in flight); chunk a multiple of 256 keys. Two per SM,
    not four, for 16-row programs: 8-16% faster on an H200 at H=16 (B=32 T=4K, B=8 T=16K, B=64 T=4K)
    and the same elsewhere (docs/design.md)."""
    target = num_sms(device) * (1 if block_m >= 64 else 2)
    splits = max(1, round(target / max(1, B * row_tiles)))
    chunk = max(floor, triton.cdiv(triton.cdiv(T, splits), floor) * floor)
    return triton.cdiv(max(T, 1), chunk), chunk


def merge_splits(o_part, ml, out_view, S: int, R: int, splits: int, rb: int | None = None, num_warps: int = 4,
                 sinks=None):
    """o_part [B, P, M, R_PAD] fp32 contiguous (each split's output, normalised by its own sum l_p) and
    ml [B, P, M, 2] fp32 contiguous (each split's row max m_p and sum l_p of exp(x - m_p), natural
    units; m_p = -inf, l_p = 0 for a split that saw no key) -> out_view [B, H, S, R] (any strides):
    sum_p w_p o_p / sum_p w_p with w_p = l_p exp(m_p - max_p m_p); zeros for a row with no key at all.
    sinks (None or [H], row = h * S + s): exp(sink_h - max) joins the denominator (attention sinks)."""
    B, P, M, R_PAD = o_part.shape
    # One program per row over the whole r (4 warps): on an H200 the fastest or within 0.5 us of it at
    # 128-1024 rows and 4-16 splits, where a quarter of r a program takes up to 3.3x as long
    # (docs/design.md). Very few rows (B*M < 64: small batch, many splits): r is split across programs,
    # so that the merge is not a handful of long serial loops (not measured).
    RB = rb or (R_PAD if B * M >= 64 else min(R_PAD, 128))   # rb: a benchmark's override
    PB = max(2, min(16, triton.next_power_of_2(P)))
    sink = sinks.to(torch.float32).contiguous() if sinks is not None else ml
    launcher(_merge_splits_kernel, o_part)[(B * M, R_PAD // RB)](
        o_part, ml, out_view, sink, S, R, splits, M,
        o_part.stride(0), o_part.stride(1),
        *out_view.stride(),
        R_PAD=R_PAD, RB=RB, PB=PB, ONE_PASS=P <= PB, HAS_SINK=sinks is not None,
        num_warps=num_warps,
    )


@dataclass(frozen=True)
class LaunchPlan:
    """What a call of `absorbed_latent_attention` launches, decided once per sizes and device."""

    core: str          # registry.absorbed_core's answer: "keys_major", "seesaw" or "triton"
    block_m: int       # rows (heads x queries) a program
    row_tiles: int
    splits: int        # key chunks, merged by `merge_splits` when more than one
    chunk: int         # keys a split
    r_pad: int         # r and dr padded for tl.dot (>= 16, a power of two)
    dr_pad: int
    m_bucket: int      # the Triton kernel's autotuning keys: rows, and keys x batch
    work: int


@functools.lru_cache(maxsize=4096)
def launch_plan(device: torch.device, dtype: torch.dtype, B: int, H: int, S: int, T: int, r: int, dr: int,
                is_causal: bool, num_splits: int | None = None, gluon: bool = True) -> LaunchPlan:
    """The kernel, tiles and splits for these sizes on this device: the answer of `registry.absorbed_core`
    (gluon=False: the Triton kernel, for calls whose strides TMA cannot take), then the split count
    that fills the GPU (`choose_splits`), or `num_splits` (tests and benchmarks)."""
    core = registry.absorbed_core(dtype, H, S, r, dr, is_causal, sm90=gluon and registry.is_sm90(device))
    # a keys-major program takes every head of a batch (BLOCK_M = 64: one 4-warp program an SM, its
    # shared memory allows no second)
    block_m = 64 if core == "keys_major" else block_m_for(H * S)
    row_tiles = triton.cdiv(H * S, block_m)
    eff_T = T if not is_causal else min(T, S)
    if num_splits is None:
        splits, chunk = choose_splits(device, B, row_tiles, eff_T, block_m)
    else:
        chunk = max(64, triton.cdiv(triton.cdiv(max(eff_T, 1), num_splits), 64) * 64)
        splits = triton.cdiv(max(eff_T, 1), chunk)
    r_pad = max(16, triton.next_power_of_2(r))   # tl.dot needs K >= 16 on the GPU
    dr_pad = max(16, triton.next_power_of_2(dr)) if dr else 16
    return LaunchPlan(core, block_m, row_tiles, splits, chunk, r_pad, dr_pad, triton.next_power_of_2(H * S),
                      work_bucket(B * eff_T))


def absorbed_latent_attention(q_lat, q_rope, latent, k_rope, mask=None, scale=1.0, is_causal=False,
                              kv_lens=None, out=None, num_splits=None, sinks=None):
    """The attention core of the absorbed form: q_lat [B, H, S, r] (q_nope W_UK, any strides),
    q_rope [B, H, S, dr], latent [B, (1,) T, r], k_rope [B, (1,) T, dr] -> o_lat [B, H, S, r] in q_lat's
    dtype (or written into `out`, any strides). kv_lens: optional int32 [B], keys j >= kv_lens[b] ignored.
    sinks: optional [H]; the merge adds them to each row's normaliser, so a call with sinks always
    takes the split path (its partial outputs and (m, l) rows), one split or more."""
    B, H, S, r = q_lat.shape
    c = as_tokens(latent, "latent")
    kr = as_tokens(k_rope, "k_rope")
    T = c.shape[1]
    dr = kr.shape[2]
    dt = q_lat.dtype
    if c.dtype != dt:
        c = c.to(dt)
    if kr.dtype != dt:
        kr = kr.to(dt)
    if q_rope.dtype != dt:
        q_rope = q_rope.to(dt)
    dev = q_lat.device      # read once: each read builds a torch.device (host time at every call)
    if out is None:
        out = torch.empty(B, H, S, r, dtype=dt, device=dev)
    if B * H * S == 0:
        return out
    plan = launch_plan(dev, dt, B, H, S, T, r, dr, bool(is_causal), num_splits)
    core = plan.core
    if core != "triton" and (is_traced(q_lat) or out.stride(-1) != 1 or not sm90.tma_ready(q_lat, q_rope, c, kr)):
        plan = launch_plan(dev, dt, B, H, S, T, r, dr, bool(is_causal), num_splits, gluon=False)
        core = "triton"
    M, BLOCK_M, row_tiles, splits, chunk = H * S, plan.block_m, plan.row_tiles, plan.splits, plan.chunk
    R_PAD, DR_PAD = plan.r_pad, plan.dr_pad
    kind, m, ms = mask_view(mask, B, S, T)
    one = splits == 1 and sinks is None
    if one:
        o_part = ml = out  # unused
        sp = (0, 0, 0)
    else:
        o_part = torch.empty(B, splits, M, R_PAD, dtype=torch.float32, device=dev)
        ml = torch.empty(B, splits, M, 2, dtype=torch.float32, device=dev)   # (m_p, l_p) per row
        sp = (o_part.stride(0), o_part.stride(1), o_part.stride(2))
    if core == "keys_major":
        keys_major.keys_major_split_attention(q_lat, q_rope, c, kr, kind, m, ms, kv_lens, out, o_part, ml, scale,
                                              chunk, splits, one_split=one)
    elif core == "seesaw":
        seesaw.seesaw_split_attention(q_lat, q_rope, c, kr, kind, m, ms, kv_lens, out, o_part, ml, scale, chunk,
                                      splits, one_split=one)
    else:
        kvl = kv_lens if kv_lens is not None else c
        launcher(_absorbed_split_kernel, q_lat)[(row_tiles, splits, B)](
            q_lat, q_rope, c, kr, m if m is not None else c, kvl, out, o_part, ml,
            float(scale), M, S, T, r, dr, chunk,
            *q_lat.stride(), *q_rope.stride(), *c.stride(), *kr.stride(), *ms, *out.stride(), *sp,
            plan.m_bucket, plan.work,
            BLOCK_M=BLOCK_M, R_PAD=R_PAD, DR_PAD=DR_PAD, HAS_ROPE=dr > 0, MASK_KIND=kind,
            IS_CAUSAL=bool(is_causal), HAS_KVLEN=kv_lens is not None, ONE_SPLIT=one,
            DOT_PREC=dot_precision(dt),
        )
    if not one:
        merge_splits(o_part, ml, out, S, r, splits, sinks=sinks)
    return out


def absorb(q_nope, w_uk, dt):
    """q_nope [B, H, S, dn] x W_UK [H, dn, r] -> q_lat as a [B, H, S, r] view of an [H, B*S, r] product."""
    B, H, S, dn = q_nope.shape
    # cuBLAS's batched GEMM: the per-head kernel of `project` is slower here with L2 warm (5.8 against
    # 4.3 us at V3's 128 heads, B=8, on an H200) and within 0.84-1.17x with L2 cold (docs/design.md)
    q = q_nope.to(dt).permute(1, 0, 2, 3).reshape(H, B * S, dn)
    return torch.bmm(q, w_uk.to(dt)).view(H, B, S, -1).permute(1, 0, 2, 3)


def project(o_lat_hbs, w_uv, B, S, out_dtype):
    """o_lat [H, B*S, r] x W_UV^T -> [B, H, S, dv] contiguous. At decode sizes through the per-head
    kernel: 8.9 against cuBLAS's 11.6 us at 128 heads, B=8, L2 flushed, on an H200 (docs/design.md)."""
    H = o_lat_hbs.shape[0]
    if head_projection.takes(o_lat_hbs, B * S):
        out = torch.empty(B, H, S, w_uv.shape[1], dtype=out_dtype, device=o_lat_hbs.device)
        # written in place through [H, B*S, dv] strides where (b, s) folds into one stride (S = 1)
        y = out[:, :, 0].transpose(0, 1) if S == 1 else torch.empty(
            H, B * S, w_uv.shape[1], dtype=out_dtype, device=o_lat_hbs.device)
        head_projection.per_head_matmul(o_lat_hbs, w_uv.transpose(1, 2), y)
        if S != 1:
            out.copy_(y.view(H, B, S, -1).permute(1, 0, 2, 3))
        return out
    o = torch.bmm(o_lat_hbs, w_uv.to(o_lat_hbs.dtype).transpose(1, 2))
    return o.view(H, B, S, -1).permute(1, 0, 2, 3).to(out_dtype).contiguous()


def absorbed_decode(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask=None, scale=1.0, is_causal=False,
                    kv_lens=None, sinks=None):
    """Drop-in for `absorbed_reference` (same signature), kernel-backed; kv_lens is an internal extra."""
    d = check_args(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask)
    check_sinks(sinks, d)
    dt = kernel_dtype(q_nope.dtype)
    if dt is None:
        raise TypeError(f"the MLA kernels take float16, bfloat16 or float32, got {q_nope.dtype} "
                        "(kernels.registry.kernel_for sends other dtypes to the reference)")
    B, H, S = d.batch, d.heads, d.q_len
    if kv_lens is not None:   # a scalar (static cache fill) or per row; int32 [B] for the kernel
        kv_lens = kv_lens.to(device=d.device, dtype=torch.int32).reshape(-1).expand(B).contiguous()
    q_lat = absorb(q_nope, w_uk, dt)
    o_lat = torch.empty(H, B * S, d.rank, dtype=dt, device=d.device)   # d.device: q_nope's, read once
    absorbed_latent_attention(q_lat, q_rope, latent, k_rope, mask, scale, is_causal, kv_lens=kv_lens,
                              out=o_lat.view(H, B, S, d.rank).permute(1, 0, 2, 3), sinks=sinks)
    return project(o_lat, w_uv, B, S, q_nope.dtype)


absorbed_decode.accepts_kv_lens = True   # mla.absorbed passes a static cache's valid length through


def _inlinable(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask=None, scale=1.0, is_causal=False, kv_lens=None,
               sinks=None):
    """Whether a traced call may become Triton launches in Inductor's code: not when it would take a
    Gluon kernel (wrap_triton takes Triton's JIT functions only); mla.absorbed_opaque runs that one."""
    _, H, S, _ = q_nope.shape
    dt, r, dr = kernel_dtype(q_nope.dtype), w_uk.shape[-1], q_rope.shape[-1]
    return registry.absorbed_core(dt, H, S, r, dr, is_causal, sm90=registry.is_sm90(q_nope.device)) == "triton"


absorbed_decode.inlinable = _inlinable
