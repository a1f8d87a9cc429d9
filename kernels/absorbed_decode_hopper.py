"""The absorbed split kernel for Hopper (sm_90), written in Gluon: FlashMLA's layout of the work.

Where it applies, `hopper_split_attention` now runs `absorbed_decode_seesaw` (the same layout on
FlashMLA's schedule: 0.82-0.91x this kernel's time at H=128); this lockstep kernel stays as the
baseline of that A/B (MLA_COMPILE_SEESAW=0) and as the home of `applies` and the TMA helpers.

Same math and the same split/merge scheme as `absorbed_decode._absorbed_split_kernel` (see that
module's docstring): per batch b and split p, the rows i = heads of one 64-row tile,

    x[i, j]  = (q_lat[i] . c[b, j] + q_rope[i] . kp[b, j]) * scale         j in [p*chunk, min((p+1)*chunk, len_b))
    o_p[i]   = sum_j softmax_j(x[i, :]) c[b, j],   m_p[i] = max_j x[i, j],   l_p[i] = sum_j exp(x[i, j] - m_p[i])

and `absorbed_decode.merge_splits` combines the splits (with one split, the kernel writes the output).

Why a second kernel: the Triton one runs at 1.53x FlashMLA's time at H=128, B=8, T=4K on an H200
(ncu: one CTA per SM, latency bound; Triton's TMA and automatic warp specialisation did not help,
benchmarks/results/absorbed-experiments-NVIDIA-H200.md). Gluon places the pieces by hand:

- 8 warps = 2 warpgroups, every MMA layout warps_per_cta [4, 2]: the warpgroups split the N side,
  so the 64 x 512 fp32 accumulator is 64 x 256 per warpgroup (128 registers a thread; the latent
  arrives as two 256-wide TMA boxes, a box side being at most 256 elements);
- Q (64 x 512 + 64 x 64 RoPE) is loaded by TMA into shared memory once; tiles of 64 keys (latent
  and RoPE) arrive by TMA into a two-stage ring, one mbarrier a stage; the same tile is the K
  operand of Q K^T (a permuted view) and the V operand of P V;
- the device-side descriptors of the latent are per batch with the valid length as their row
  count, so TMA zero-fills past it: the unwritten tail of a static cache never reaches P V, where
  0 x NaN would poison the sum;
- P goes through 8 KB of shared memory: each warpgroup holds half of P's columns and needs all;
- the RoPE part of Q (64 columns) is held in registers as the A operand of its Q K^T piece, which
  takes that share of Q's reads off shared memory (`Q_REG_CHUNKS`; 2 also holds the last 64 latent
  columns, 1-4% faster at H=128 but 248-255 registers, so 1 is kept);
- the row sums l stay a 64 x 64 tile of per-column partial sums, rescaled like the accumulator and
  reduced once after the loop (`DEFER_L`): one cross-warpgroup reduction (shared memory and a barrier)
  less per key tile. Together 3-5% faster (benchmarks/results/hopper-variants-NVIDIA-H200.md).
  ncu at H=128 B=8 T=16K (ncu-hopper-H200.txt): the tensor pipe is 40% busy, one CTA of 8 warps per
  SM (registers and shared memory both allow one), and barrier waits are the largest stall (2.5 of
  8.3 cycles per issued instruction), then the wgmma wait (1.3): the lockstep loop, not a unit's
  throughput, is the limit. MLA_COMPILE_GLUON_QREG / MLA_COMPILE_GLUON_DEFER_L set them (A/B runs).

First measured on an H200 as an experiment (benchmarks/results/gluon-absorbed-NVIDIA-H200.md, the
script benchmarks/gluon_absorbed.py of commit ddae479): 37.4 us at H=128 B=8 T=4K against 49.5 for
the Triton kernel and 32.4 for FlashMLA; 0.69-0.76x the Triton kernel's time at the other B >= 8
points. Its FA3-style variant (S_{i+1} issued before P_i V_i, the softmax overlapping P_i V_i on the
tensor cores) was 10-16% slower than this one and was not kept. In production (bench_kernels.py,
14:37 UTC, in git history): 37.0 us against FlashMLA's 32.3 at B=8 T=4K, 1.30-1.37x FlashMLA at the
larger H=128 points; with the list's last two items (16:37 UTC, benchmarks/results/kernels-NVIDIA-H200.md):
36.1 us against 32.2 (1.12x) at B=8 T=4K and 1.26-1.33x at the other B >= 8, T >= 4K points.
FlashMLA's own schedule, the two warpgroups taking alternate key tiles (gl.warp_specialize with a
one-warp TMA producer; the row max, P and its rescale factor handed between them through shared
memory), was built and measured at commit 93255aa (benchmarks/results/seesaw-ab-NVIDIA-H200.md,
18:27-18:34 UTC, its GPU tests all passing): with 64-key tiles in two stages 1.04-1.12x this kernel's
time (a pair of tiles holds both stages, so the next pair's loads start late), with 32-key tiles in
four stages 0.98-1.01x. Neither was kept. Issuing tile i+1's Q K^T right behind tile i's P V in this
loop (the tensor cores then run the two back to back) took 0.98-1.07x its time (hopper-variants run 3,
commit df642d5) and was not kept either.
hopper-ab-NVIDIA-H200.md compares it with the Triton kernel (0.58-0.73x its time) and, forced to 16
and 32 heads (its 64-row tile then 75% / 50% padding), finds it slower at H=16 (1.10-1.33x) and at
H=32 0.92-1.08x. Those head counts go to the keys-major kernel (absorbed_decode_keys_major), which
has no padding there and measured 0.67-1.00x the Triton kernel's time (keys-major-ab-NVIDIA-H200.md).

`applies(...)` says when this kernel runs: a Hopper GPU, bf16/fp16, r = 512, dr = 64, one query
position, more than 32 heads, not causal (a bool or float mask, HF's decode mask, is read per key
tile), and TMA-compatible strides and alignment; the Triton kernel takes everything else.
MLA_COMPILE_GLUON=0 turns it off (the Triton kernel then runs everywhere).
"""

from __future__ import annotations

import os

import torch
import triton

try:   # Gluon is Triton's; an older or CPU-only Triton without it just leaves the Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    # Triton 3.6 (PyTorch 2.11's) names the TMA load `async_copy_global_to_shared` and the CTA barrier
    # `thread_barrier`; 3.9 has `async_load` and `barrier` only. Take whichever this Triton has.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GLUON = True
except (ImportError, AttributeError):   # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

R, DR = 512, 64
HALF = R // 2
BLOCK_M = 64       # rows (heads) a program: one wgmma M per warpgroup
BLOCK_N = 64       # keys a tile
NUM_STAGES = 2     # 72 KB of Q + 2 x 72 KB of key tiles + 8 KB of P = 224 KB of the 227 KB
NUM_WARPS = 8      # two warpgroups
# Fewer heads than MIN_HEADS go to the keys-major kernel (absorbed_decode_keys_major: no padding of
# the MMA's M there). Forced to 16 and 32 heads, this kernel's 64-row tile (then 75% / 50% padding)
# measured 1.10-1.33x the Triton kernel's time at H=16 and 0.92-1.08x at H=32
# (hopper-ab-NVIDIA-H200.md, 16:34 UTC); the keys-major kernel 0.67-1.00x (keys-major-ab-NVIDIA-H200.md).
MIN_HEADS = 33
Q_REG_CHUNKS = int(os.environ.get("MLA_COMPILE_GLUON_QREG", "1"))   # see the kernel; A/B knobs for now
DEFER_L = os.environ.get("MLA_COMPILE_GLUON_DEFER_L", "1") == "1"


_CAPABILITY: dict = {}


def takes_sizes(dtype: torch.dtype, H, S, r, dr, is_causal: bool) -> bool:
    """The size and dtype part of `applies` (fake tensors can be asked too)."""
    return (not is_causal and S == 1 and r == R and dr == DR and dtype in (torch.bfloat16, torch.float16)
            and H >= MIN_HEADS)


def enabled() -> bool:
    """This Triton has Gluon and MLA_COMPILE_GLUON is not 0."""
    return HAVE_GLUON and os.environ.get("MLA_COMPILE_GLUON") != "0"


def applies(device: torch.device, dtype: torch.dtype, H: int, S: int, r: int, dr: int, is_causal: bool) -> bool:
    """Whether `absorbed_latent_attention` takes this kernel (from sizes and dtypes alone, so that a
    traced call's fake tensors can be asked too; `tma_ready` then checks the real tensors)."""
    if device.type != "cuda" or not enabled():
        return False
    if not takes_sizes(dtype, H, S, r, dr, is_causal):
        return False
    return is_sm90(device)


def is_sm90(device: torch.device) -> bool:
    """A Hopper GPU (sm_90), which both Gluon kernels are written for (cached per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx] == (9, 0)


def tma_ready(*tensors) -> bool:
    """TMA needs a unit last stride and 16-byte aligned bases and strides (of real tensors; the
    stride of a dimension of size 1 is never used)."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((st * es) % 16 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
            return False
    return True


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


try:
    from triton.runtime._allocation import NullAllocator as _NullAllocator, _allocator
except ImportError:   # pragma: no cover - another Triton's internals: always set ours
    _NullAllocator, _allocator = None, None


def ensure_allocator() -> None:
    """Device-side TMA descriptors live in a global scratch buffer that the launch asks Triton's
    allocator for. Set one on PyTorch's caching allocator unless the user has set their own (the
    setting is a context variable: a new thread starts without one, hence the check at each call)."""
    if _allocator is None or isinstance(_allocator.get(), _NullAllocator):
        triton.set_allocator(_torch_scratch)


if HAVE_GLUON:
    @gluon.jit
    def _probs(qk, m_prev, n0, stop, scale, MASK, s_mt, MASK_KIND: gl.constexpr, BLOCK_N: gl.constexpr,
               col_layout: gl.constexpr):
        # One key tile of the online softmax, shared by both heads-major Gluon kernels: scores in natural
        # units (x = q.k * scale + float mask) and exp2 for the exponentials, so that an HF float mask's
        # finfo.min stays finite here, as in the reference (a row masked everywhere by it averages all
        # keys, like softmax over equal scores). m_safe keeps a row that has seen only -inf (bool-masked)
        # keys at m = -inf, p = 0 (zeros, weight 0 in the merge). Returns fp32 p, alpha = exp(m_prev -
        # m_new) and m_new.
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=col_layout)
        valid = offs_n < stop
        x = qk * scale
        if MASK_KIND == 1:
            valid = valid & (gl.load(MASK + offs_n * s_mt, mask=valid, other=0) != 0)
        if MASK_KIND == 2:
            x = x + gl.expand_dims(gl.load(MASK + offs_n * s_mt, mask=valid, other=0.0).to(gl.float32), 0)
        x = gl.where(gl.expand_dims(valid, 0), x, float("-inf"))
        m_new = gl.maximum(m_prev, gl.max(x, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        # subtract before scaling by log2(e): finfo.min * log2(e) overflows fp32
        alpha = gl.exp2((m_prev - m_safe) * 1.4426950408889634)
        p = gl.exp2((x - gl.expand_dims(m_safe, 1)) * 1.4426950408889634)
        return p, alpha, m_new

    @gluon.jit
    def _softmax_step(qk, m_i, l_i, n0, stop, scale, MASK, s_mt, dtype: gl.constexpr, MASK_KIND: gl.constexpr,
                      BLOCK_N: gl.constexpr, col_layout: gl.constexpr, DEFER_L: gl.constexpr):
        # `_probs` and the row sums: P in the input dtype for P V, the updated (m, l)
        p, alpha, m_new = _probs(qk, m_i, n0, stop, scale, MASK, s_mt, MASK_KIND, BLOCK_N, col_layout)
        if DEFER_L:   # l_i is a [BLOCK_M, BLOCK_N] tile of column sums, reduced once after the loop
            l_new = l_i * gl.expand_dims(alpha, 1) + p
        else:
            l_new = l_i * alpha + gl.sum(p, axis=1)
        return p.to(dtype), alpha, m_new, l_new

    @gluon.jit
    def _refill(c_desc, kr_desc, bar, lo, hi, kr, key0, pred):
        # One stage = two latent halves + the RoPE tile, all on one mbarrier.
        mbarrier.expect(bar, 2 * c_desc.block_type.nbytes + kr_desc.block_type.nbytes, pred=pred)
        _tma_load(c_desc, [key0, 0], bar, lo, pred=pred)
        _tma_load(c_desc, [key0, c_desc.block_type.shape[1]], bar, hi, pred=pred)
        _tma_load(kr_desc, [key0, 0], bar, kr, pred=pred)

    @gluon.jit
    def _issue_scores(q_smem, qr_smem, qr_reg, qh_reg, lo, hi, kr, s_zero, Q_REG_CHUNKS: gl.constexpr,
                      HI_SMEM: gl.constexpr):
        # Q K^T of one key tile, issued asynchronously (one wgmma group a call): the latent halves from
        # shared memory, the RoPE part (and with Q_REG_CHUNKS=2 the last 64 latent columns) of Q from
        # registers as the A operand.
        qk = warpgroup_mma(q_smem.index(0), lo.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if Q_REG_CHUNKS >= 2:   # 192 = 128 + 64 from shared memory (a power of two a piece)
            qk = warpgroup_mma(q_smem.index(1).slice(0, 128, dim=1),
                               hi.slice(0, 128, dim=1).permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma(q_smem.index(1).slice(128, 64, dim=1),
                               hi.slice(128, 64, dim=1).permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma(qh_reg, hi.slice(HI_SMEM, 64, dim=1).permute((1, 0)), qk, is_async=True)
        else:
            qk = warpgroup_mma(q_smem.index(1), hi.permute((1, 0)), qk, is_async=True)
        if Q_REG_CHUNKS >= 1:
            qk = warpgroup_mma(qr_reg, kr.permute((1, 0)), qk, is_async=True)
        else:
            qk = warpgroup_mma(qr_smem, kr.permute((1, 0)), qk, is_async=True)
        return qk

    @gluon.jit
    def _q_to_registers(Q, QR, b, row0, H, s_qb, s_qh, s_rb, s_rh, Q_ROWS: gl.constexpr, HALF: gl.constexpr,
                        DR: gl.constexpr):
        # Q's rows row0.. row0 + Q_ROWS of batch b (its two latent halves and its RoPE part) by plain loads,
        # rows past H as zeros (what TMA's bounds give the descriptor path)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        rows = row0 + gl.arange(0, Q_ROWS, layout=gl.SliceLayout(1, ld))
        ok = gl.expand_dims(rows < H, 1)
        cols = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, ld)), 0)
        q_ptrs = Q + b * s_qb + gl.expand_dims(rows, 1) * s_qh + cols
        q_lo = gl.load(q_ptrs, mask=ok, other=0.0)
        q_hi = gl.load(q_ptrs + HALF, mask=ok, other=0.0)
        cols_r = gl.expand_dims(gl.arange(0, DR, layout=gl.SliceLayout(0, ld)), 0)
        q_r = gl.load(QR + b * s_rb + gl.expand_dims(rows, 1) * s_rh + cols_r, mask=ok, other=0.0)
        return q_lo, q_hi, q_r

    @gluon.jit
    def _split_prologue(Q, QR, C, KR, KVLEN, b, pid_p, row0, H, T, chunk, s_qb, s_qh, s_rb, s_rh, s_cb, s_ct, s_kb,
                        s_kt, Q_ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr, DR: gl.constexpr,
                        NUM_STAGES: gl.constexpr, HAS_KVLEN: gl.constexpr, P_SHAPE: gl.constexpr,
                        LEAN_START: gl.constexpr = False):
        # Shared by both Gluon split kernels: the per-batch TMA descriptors (Q's rows past H and the
        # latent's past the valid length read as zeros), the shared memory (Q_ROWS rows of Q, the key
        # tiles' ring, P of P_SHAPE), the barriers, and the first loads: Q and the ring's first tiles.
        # LEAN_START (the keys-major kernel): each descriptor made on the device costs a global release
        # fence, about 1 us in that kernel's timeline (keys-major-timeline-NVIDIA-H200.md), so Q goes
        # through registers instead (plain loads, rows past H masked to zero, under the latent's
        # descriptors; q_bar is then never armed: do not wait on it). Issuing the first tiles' latent
        # halves before the RoPE descriptor was made as well gained nothing there (run 3): the first
        # tile's arrival is the burst of every program's first loads, not the fences.
        dtype: gl.constexpr = C.dtype.element_ty
        if LEAN_START:
            q_lo, q_hi, q_r = _q_to_registers(Q, QR, b, row0, H, s_qb, s_qh, s_rb, s_rh, Q_ROWS, HALF, DR)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, HALF], dtype)
        qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, DR], dtype)
        half_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF], dtype)
        rope_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DR], dtype)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for(P_SHAPE, dtype)

        t_end = T
        if HAS_KVLEN:
            t_end = gl.minimum(t_end, gl.load(KVLEN + b))
        if not LEAN_START:
            q_desc = tma.make_tensor_descriptor(Q + b * s_qb, [H, 2 * HALF], [s_qh, 1], [Q_ROWS, HALF], q_sl)
            qr_desc = tma.make_tensor_descriptor(QR + b * s_rb, [H, DR], [s_rh, 1], [Q_ROWS, DR], qr_sl)
        c_desc = tma.make_tensor_descriptor(C + b * s_cb, [gl.maximum(t_end, 1), 2 * HALF], [s_ct, 1],
                                            [BLOCK_N, HALF], half_sl)
        kr_desc = tma.make_tensor_descriptor(KR + b * s_kb, [gl.maximum(t_end, 1), DR], [s_kt, 1],
                                             [BLOCK_N, DR], rope_sl)

        q_smem = gl.allocate_shared_memory(dtype, [2, Q_ROWS, HALF], q_sl)
        qr_smem = gl.allocate_shared_memory(dtype, [Q_ROWS, DR], qr_sl)
        lo_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HALF], half_sl)
        hi_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HALF], half_sl)
        kr_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, DR], rope_sl)
        p_smem = gl.allocate_shared_memory(dtype, P_SHAPE, p_sl)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_bar = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for st in gl.static_range(NUM_STAGES):
            mbarrier.init(kv_bar.index(st), count=1)
        fence_async_shared()   # the barrier inits must be visible to the TMA unit before the first copy

        start = pid_p * chunk
        stop = gl.minimum(start + chunk, t_end)
        n_tiles = gl.cdiv(stop - start, BLOCK_N)   # <= 0 for a split wholly past a short valid length

        if not LEAN_START:
            mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + qr_desc.block_type.nbytes)
            _tma_load(q_desc, [row0, 0], q_bar, q_smem.index(0))
            _tma_load(q_desc, [row0, HALF], q_bar, q_smem.index(1))
            _tma_load(qr_desc, [row0, 0], q_bar, qr_smem)
        for st in gl.static_range(NUM_STAGES):
            _refill(c_desc, kr_desc, kv_bar.index(st), lo_smem.index(st), hi_smem.index(st), kr_smem.index(st),
                    start + st * BLOCK_N, st < n_tiles)
        if LEAN_START:
            q_smem.index(0).store(q_lo)
            q_smem.index(1).store(q_hi)
            qr_smem.store(q_r)
            fence_async_shared()   # generic-proxy stores, read by the warpgroup MMAs (async proxy)
            _cta_barrier()
        return (start, stop, n_tiles, c_desc, kr_desc, q_smem, qr_smem, lo_smem, hi_smem, kr_smem, p_smem, q_bar,
                kv_bar)

    @gluon.jit
    def _hopper_split_kernel(
        Q, QR, C, KR, MASK, KVLEN, O, OP, ML, scale, H, T, chunk, splits,
        s_qb, s_qh, s_rb, s_rh, s_cb, s_ct, s_kb, s_kt, s_mb, s_mt, s_ob, s_oh,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr, DR: gl.constexpr,
        NUM_STAGES: gl.constexpr, MASK_KIND: gl.constexpr, HAS_KVLEN: gl.constexpr, ONE_SPLIT: gl.constexpr,
        Q_REG_CHUNKS: gl.constexpr = 0, DEFER_L: gl.constexpr = False,
    ):
        dtype: gl.constexpr = C.dtype.element_ty
        pid_m = gl.program_id(0)
        pid_p = gl.program_id(1)
        b = gl.program_id(2).to(gl.int64)

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BLOCK_N // 2, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, HALF // 2, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        (start, stop, n_tiles, c_desc, kr_desc, q_smem, qr_smem, lo_smem, hi_smem, kr_smem, p_smem, q_bar,
         kv_bar) = _split_prologue(Q, QR, C, KR, KVLEN, b, pid_p, pid_m * BLOCK_M, H, T, chunk, s_qb, s_qh, s_rb,
                                   s_rh, s_cb, s_ct, s_kb, s_kt, BLOCK_M, BLOCK_N, HALF, DR, NUM_STAGES, HAS_KVLEN,
                                   [BLOCK_M, BLOCK_N])

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        # DEFER_L: the row sums l stay a tile of per-column partial sums (rescaled like the accumulator)
        # and are reduced once after the loop, which takes a reduction across the two warpgroups (shared
        # memory and a barrier) out of every key tile.
        if DEFER_L:
            l_i = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        else:
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        acc_lo = gl.zeros([BLOCK_M, HALF], gl.float32, layout=o_layout)
        acc_hi = gl.zeros([BLOCK_M, HALF], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)
        # Q K^T reads its A operand (Q) from shared memory once per warpgroup per tile; Q_REG_CHUNKS
        # 64-column pieces of it (the RoPE part, then the last 64 latent columns) are held in
        # registers instead, which takes that share of the reads off shared memory.
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        HI_SMEM: gl.constexpr = HALF - 64 if Q_REG_CHUNKS >= 2 else HALF
        qr_reg = 0   # placeholders where no piece of Q is held in registers
        qh_reg = 0
        if Q_REG_CHUNKS >= 1:
            qr_reg = qr_smem.load(a_layout)
        if Q_REG_CHUNKS >= 2:
            qh_reg = q_smem.index(1).slice(HI_SMEM, 64, dim=1).load(a_layout)
        for i in range(0, n_tiles):
            s = i % NUM_STAGES
            mbarrier.wait(kv_bar.index(s), (i // NUM_STAGES) & 1)
            lo = lo_smem.index(s)
            hi = hi_smem.index(s)
            kr = kr_smem.index(s)
            qk = _issue_scores(q_smem, qr_smem, qr_reg, qh_reg, lo, hi, kr, s_zero, Q_REG_CHUNKS, HI_SMEM)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, start + i * BLOCK_N, stop, scale, MASK + b * s_mb,
                                               s_mt, dtype, MASK_KIND, BLOCK_N, col_s, DEFER_L)
            # The previous tile's P V was waited for and followed by a CTA barrier, so p_smem is free;
            # the barrier below makes every warp's P visible before either warpgroup's P V reads it.
            p_smem.store(p)
            fence_async_shared()
            _cta_barrier()
            alpha_o = gl.convert_layout(alpha, row_o)
            acc_lo = warpgroup_mma(p_smem, lo, acc_lo * gl.expand_dims(alpha_o, 1), is_async=True)
            acc_hi = warpgroup_mma(p_smem, hi, acc_hi * gl.expand_dims(alpha_o, 1), is_async=True)
            acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, acc_hi))
            _cta_barrier()   # both warpgroups are done with stage s: refill it
            _refill(c_desc, kr_desc, kv_bar.index(s), lo, hi, kr, start + (i + NUM_STAGES) * BLOCK_N,
                    i + NUM_STAGES < n_tiles)

        mbarrier.invalidate(q_bar)
        for st in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(kv_bar.index(st))

        if DEFER_L:
            l_i = gl.sum(l_i, axis=1)
        # A split with no key (l = 0, m = -inf) writes zeros, which the merge weighs as nothing.
        has = l_i > 0
        inv_o = gl.convert_layout(1.0 / gl.where(has, l_i, 1.0), row_o)
        rows_o = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
        cols_o = gl.arange(0, HALF, layout=col_o)
        ok = gl.expand_dims(rows_o < H, 1)
        o_lo = acc_lo * gl.expand_dims(inv_o, 1)
        o_hi = acc_hi * gl.expand_dims(inv_o, 1)
        if ONE_SPLIT:
            ptrs = O + b * s_ob + gl.expand_dims(rows_o, 1) * s_oh + gl.expand_dims(cols_o, 0)
            gl.store(ptrs, o_lo.to(O.dtype.element_ty), mask=ok)
            gl.store(ptrs + HALF, o_hi.to(O.dtype.element_ty), mask=ok)
        else:
            # o_part [B, P, H, 512] fp32 and ML [B, P, H, 2] fp32, (m, l) per row in natural units, not
            # folded into m + log(l), which rounds to m at HF's finfo.min: the Triton kernel's layout
            base = (b * splits + pid_p) * H
            ptrs = OP + (base + gl.expand_dims(rows_o, 1)) * (2 * HALF) + gl.expand_dims(cols_o, 0)
            gl.store(ptrs, o_lo, mask=ok)
            gl.store(ptrs + HALF, o_hi, mask=ok)
            rows_s = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
            ml = ML + 2 * (base + rows_s)
            gl.store(ml, m_i, mask=rows_s < H)
            gl.store(ml + 1, l_i, mask=rows_s < H)


def compile_for_sm90(mask_kind: int = 1, has_kvlen: bool = True, one_split: bool = False, q_reg_chunks: int = None,
                     defer_l: bool = None):
    """Compile the kernel ahead of time for sm_90 with the installed Triton; no GPU needed (Triton's
    wheel carries ptxas). Returns the compiled kernel (`.asm["ptx"]`, `.metadata.shared`). Run it in a
    process without TRITON_INTERPRET=1: the interpreter's patched builtins break Gluon's compiler."""
    consts = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HALF=HALF, DR=DR, NUM_STAGES=NUM_STAGES, MASK_KIND=mask_kind,
                  HAS_KVLEN=has_kvlen, ONE_SPLIT=one_split,
                  Q_REG_CHUNKS=Q_REG_CHUNKS if q_reg_chunks is None else q_reg_chunks,
                  DEFER_L=DEFER_L if defer_l is None else defer_l)
    return compile_gluon_for_sm90(_hopper_split_kernel, consts, mask_kind, NUM_WARPS)


def compile_gluon_for_sm90(kernel, consts: dict, mask_kind: int, num_warps: int):
    """triton.compile of a Gluon split kernel with this module's argument list (9 pointers, the
    scale, 16 ints; bf16 tensors) for sm_90, the pointers 16-byte aligned as the launcher specialises."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = [n for n in kernel.arg_names if n not in consts]   # pointers, scale, then 16 ints
    mask_type = {0: "*bf16", 1: "*u8", 2: "*bf16"}[mask_kind]
    types = ["*bf16"] * 4 + [mask_type, "*i32", "*bf16", "*fp32", "*fp32", "fp32"] + ["i32"] * 16
    assert len(names) == len(types), names
    sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(9)}   # what the launcher specialises
    src = GluonASTSource(kernel, sig, consts, aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def hopper_split_attention(q_lat, q_rope, c, kr, mask_kind: int, mask, mask_strides, kv_lens, out, o_part, ml,
                           scale: float, chunk: int, splits: int) -> None:
    """Launch the split kernel: q_lat/q_rope [B, H, 1, *], c [B, T, r], kr [B, T, dr] (token views), the
    mask as `absorbed_decode.mask_view` gives it ([B, 1, T] view: kind 0 none, 1 bytes, 2 float), kv_lens
    int32 [B] or None; with one split it writes `out` [B, H, 1, r], else o_part [B, P, H, r] fp32 and ml
    [B, P, H, 2] fp32, each split's row max m and sum l (what `merge_splits` takes)."""
    from mla_compile.kernels import absorbed_decode_seesaw as seesaw   # it imports this module

    if seesaw.enabled():   # FlashMLA's schedule, 0.82-0.91x this kernel's time (MLA_COMPILE_SEESAW=0: this one)
        return seesaw.seesaw_split_attention(q_lat, q_rope, c, kr, mask_kind, mask, mask_strides, kv_lens, out,
                                             o_part, ml, scale, chunk, splits)
    B, H, _, _ = q_lat.shape
    T = c.shape[1]
    ensure_allocator()
    _hopper_split_kernel[(triton.cdiv(H, BLOCK_M), splits, B)](
        q_lat, q_rope, c, kr, mask if mask is not None else c, kv_lens if kv_lens is not None else c,
        out, o_part, ml, float(scale), H, T, chunk, splits,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        c.stride(0), c.stride(1), kr.stride(0), kr.stride(1), mask_strides[0], mask_strides[2],
        out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HALF=HALF, DR=DR, NUM_STAGES=NUM_STAGES, MASK_KIND=mask_kind,
        HAS_KVLEN=kv_lens is not None, ONE_SPLIT=splits == 1, Q_REG_CHUNKS=Q_REG_CHUNKS, DEFER_L=DEFER_L,
        num_warps=NUM_WARPS,
    )
