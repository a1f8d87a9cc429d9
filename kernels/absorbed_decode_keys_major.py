"""The absorbed split kernel for Hopper at few heads (H <= 32), keys-major, written in Gluon.

Same math and split/merge scheme as `absorbed_decode._absorbed_split_kernel` (see that module's
docstring), computed transposed: per batch b and split p, with the heads as columns,

    x^T[j, h]   = (c[b, j] . q_lat[h] + kp[b, j] . q_rope[h]) * scale     j in [p*chunk, min((p+1)*chunk, len_b))
    o_p^T[:, h] = sum_j c[b, j]^T softmax_j(x^T[:, h]),   m_p[h] = max_j x^T[j, h],   l_p[h] = sum_j exp(x^T[j, h] - m_p[h])

Why transposed: Hopper's warpgroup MMA has M = 64 rows a warpgroup. With the heads as rows
(`absorbed_decode_seesaw`) a 16- or 32-head tile is 75% / 50% padding, and the MMA work doubles or
quadruples; with keys as rows both products have M >= 64 and the heads are the MMA's N (16 or 32,
no padding): x^T = C Q^T is [64 keys, heads] and o^T = C^T P^T is [512, heads]. At these head
counts the kernel must stream the latent at memory speed (about 60 FLOP a byte at H=32, under the
tensor cores' ridge), so the MMA work only has to stay under the load time, not be hidden behind
the other warpgroup's: one warpgroup (4 warps) does everything in turn, and a two-stage TMA
ring of 64-key tiles (2 x 72 KB) keeps one tile in flight while the other is computed.

- the latent tile is the A operand of x^T (keys x latent, K-major) and, as a permuted view, the A
  operand of o^T (latent x keys, MN-major): one copy in shared memory serves both;
- Q (heads x 576) comes through registers into shared memory (rows past H as zeros), the B operand of x^T;
- the softmax runs down the columns (a max across the 4 warps, which Gluon does through shared
  memory), the row sums l stay a [64, heads] tile of partial sums reduced once after the loop;
- P^T goes through 2-4 KB of shared memory as the B operand of o^T;
- the latent descriptors are per batch with the valid length as their row count, so TMA zero-fills
  past it (0 x NaN from a static cache's unwritten tail never reaches o^T).

Measured figures: docs/performance.md; variants measured and not kept: docs/design.md.

`takes_sizes(...)` says when it runs (on a Hopper GPU, with TMA-compatible strides, `sm90.tma_ready`):
bf16/fp16, r = 512, dr = 64, one query position, at most 32 heads, not causal;
`kernels/registry.absorbed_core` asks it.
"""

from __future__ import annotations

import torch
import triton

from mla_compile.kernels import sm90

if sm90.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from mla_compile.kernels.sm90 import LOG2E, _cta_barrier, _refill, _split_prologue

R, DR, HALF = sm90.R, sm90.DR, sm90.HALF
BLOCK_N = 64        # keys a tile: the MMA's M
NUM_STAGES = 2      # 2 x 72 KB of key tiles + Q (18 or 36 KB) + P^T: a third stage does not fit
NUM_WARPS = 4       # one warpgroup
MAX_HEADS = 32


def block_heads(H: int) -> int:
    """The MMA's N: 16 or 32 heads (a power of two for Gluon's layouts; padding columns are free)."""
    return 16 if H <= 16 else 32


def takes_sizes(dtype: torch.dtype, H, S, r, dr, is_causal: bool) -> bool:
    """The size and dtype part of `applies` (fake tensors can be asked)."""
    return (not is_causal and S == 1 and r == R and dr == DR and dtype in (torch.bfloat16, torch.float16)
            and H <= MAX_HEADS)


if sm90.HAVE_GLUON:
    @gluon.jit
    def _keys_major_split_kernel(
        Q, QR, C, KR, MASK, KVLEN, O, OP, ML, scale, H, T, chunk, splits,
        s_qb, s_qh, s_rb, s_rh, s_cb, s_ct, s_kb, s_kt, s_mb, s_mt, s_ob, s_oh,
        BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr, DR: gl.constexpr,
        NUM_STAGES: gl.constexpr, MASK_KIND: gl.constexpr, HAS_KVLEN: gl.constexpr, ONE_SPLIT: gl.constexpr,
    ):
        dtype: gl.constexpr = C.dtype.element_ty
        pid_p = gl.program_id(0)
        b = gl.program_id(1).to(gl.int64)
        # x^T [keys, heads] and o^T [latent, heads]: the heads are the MMA's N in both
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_H, 16])
        key_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        head_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        dim_o: gl.constexpr = gl.SliceLayout(1, s_layout)

        (start, stop, n_tiles, c_desc, kr_desc, q_smem, qr_smem, lo_smem, hi_smem, kr_smem, p_smem, q_bar,
         kv_bar) = _split_prologue(Q, QR, C, KR, KVLEN, b, pid_p, 0, H, T, chunk, s_qb, s_qh, s_rb, s_rh, s_cb, s_ct,
                                   s_kb, s_kt, BLOCK_H, BLOCK_N, HALF, DR, NUM_STAGES, HAS_KVLEN, [BLOCK_N, BLOCK_H])

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=head_s)
        l_i = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=s_layout)   # per-key partial sums
        acc_lo = gl.zeros([HALF, BLOCK_H], gl.float32, layout=s_layout)
        acc_hi = gl.zeros([HALF, BLOCK_H], gl.float32, layout=s_layout)
        s_zero = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=s_layout)
        for i in range(0, n_tiles):
            s = i % NUM_STAGES
            mbarrier.wait(kv_bar.index(s), (i // NUM_STAGES) & 1)
            lo = lo_smem.index(s)
            hi = hi_smem.index(s)
            kr = kr_smem.index(s)
            xt = warpgroup_mma(lo, q_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            xt = warpgroup_mma(hi, q_smem.index(1).permute((1, 0)), xt, is_async=True)
            xt = warpgroup_mma(kr, qr_smem.permute((1, 0)), xt, is_async=True)
            xt = warpgroup_mma_wait(num_outstanding=0, deps=(xt, ))

            # online softmax down the columns, in natural units with exp2 (as the row-major kernels:
            # finfo.min of an HF float mask stays finite; m_safe keeps an all -inf column at l = 0)
            offs_n = start + i * BLOCK_N + gl.arange(0, BLOCK_N, layout=key_s)
            valid = offs_n < stop
            x = xt * scale
            if MASK_KIND == 1:
                valid = valid & (gl.load(MASK + b * s_mb + offs_n * s_mt, mask=valid, other=0) != 0)
            if MASK_KIND == 2:
                x = x + gl.expand_dims(gl.load(MASK + b * s_mb + offs_n * s_mt, mask=valid, other=0.0)
                                       .to(gl.float32), 1)
            x = gl.where(gl.expand_dims(valid, 1), x, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(x, axis=0))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2((m_i - m_safe) * LOG2E)     # subtract first: finfo.min * log2(e) overflows
            p = gl.exp2((x - gl.expand_dims(m_safe, 0)) * LOG2E)
            l_i = l_i * gl.expand_dims(alpha, 0) + p
            m_i = m_new

            # the previous tile's o^T MMAs were waited for and followed by a barrier: p_smem is free
            p_smem.store(p.to(dtype))
            fence_async_shared()
            _cta_barrier()
            a2 = gl.expand_dims(alpha, 0)
            acc_lo = warpgroup_mma(lo.permute((1, 0)), p_smem, acc_lo * a2, is_async=True)
            acc_hi = warpgroup_mma(hi.permute((1, 0)), p_smem, acc_hi * a2, is_async=True)
            acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, acc_hi))
            _cta_barrier()   # every warp is done with stage s: refill it
            _refill(c_desc, kr_desc, kv_bar.index(s), lo, hi, kr, start + (i + NUM_STAGES) * BLOCK_N,
                    i + NUM_STAGES < n_tiles)

        mbarrier.invalidate(q_bar)
        for st in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(kv_bar.index(st))

        l_h = gl.sum(l_i, axis=0)
        has = l_h > 0    # a split with no key (l = 0, m = -inf) writes zeros, which the merge weighs as nothing
        inv = gl.expand_dims(1.0 / gl.where(has, l_h, 1.0), 0)
        heads = gl.arange(0, BLOCK_H, layout=head_s)
        dims = gl.arange(0, HALF, layout=dim_o)
        ok = gl.expand_dims(heads < H, 0)
        if ONE_SPLIT:
            ptrs = O + b * s_ob + gl.expand_dims(heads, 0) * s_oh + gl.expand_dims(dims, 1)
            gl.store(ptrs, (acc_lo * inv).to(O.dtype.element_ty), mask=ok)
            gl.store(ptrs + HALF, (acc_hi * inv).to(O.dtype.element_ty), mask=ok)
        else:
            # o_part [B, P, H, 512] fp32 and ML [B, P, H, 2] (m, l): the layout `merge_splits` takes
            base = (b * splits + pid_p) * H
            ptrs = OP + (base + gl.expand_dims(heads, 0)) * (2 * HALF) + gl.expand_dims(dims, 1)
            gl.store(ptrs, acc_lo * inv, mask=ok)
            gl.store(ptrs + HALF, acc_hi * inv, mask=ok)
            ml = ML + 2 * (base + heads)
            gl.store(ml, m_i, mask=heads < H)
            gl.store(ml + 1, l_h, mask=heads < H)
def _consts(block_h: int, mask_kind: int, has_kvlen: bool, one_split: bool) -> dict:
    return dict(BLOCK_H=block_h, BLOCK_N=BLOCK_N, HALF=HALF, DR=DR, NUM_STAGES=NUM_STAGES, MASK_KIND=mask_kind,
                HAS_KVLEN=has_kvlen, ONE_SPLIT=one_split)


def compile_for_sm90(block_h: int = 32, mask_kind: int = 1, has_kvlen: bool = True, one_split: bool = False):
    """Compile ahead of time for sm_90 (no GPU needed); see `sm90.compile_gluon_for_sm90`."""
    return sm90.compile_gluon_for_sm90(_keys_major_split_kernel, _consts(block_h, mask_kind, has_kvlen, one_split),
                                       mask_kind, num_warps=NUM_WARPS)


def keys_major_split_attention(q_lat, q_rope, c, kr, mask_kind: int, mask, mask_strides, kv_lens, out, o_part, ml,
                               scale: float, chunk: int, splits: int, one_split: bool | None = None) -> None:
    """Launch it; the arguments and outputs are `sm90.launch_split`'s. one_split (default: splits == 1)
    writes `out` directly; False writes o_part and ml for the merge even with one split (sinks)."""
    B, H = q_lat.shape[:2]
    one = splits == 1 if one_split is None else one_split
    sm90.launch_split(_keys_major_split_kernel, (splits, B), q_lat, q_rope, c, kr, mask, mask_strides, kv_lens, out,
                      o_part, ml, scale, chunk, splits,
                      **_consts(block_heads(H), mask_kind, kv_lens is not None, one), num_warps=NUM_WARPS)
