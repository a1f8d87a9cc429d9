"""The heads-major Hopper split kernel with FlashMLA's schedule: two warpgroups take alternate key tiles.

Same math, inputs and outputs as `absorbed_decode_hopper._hopper_split_kernel` (its docstring has
them); only the schedule differs. That kernel runs its two warpgroups in lockstep: both compute half
of every tile's scores, meet for the row max, exchange P, and each multiplies P by its half of the
latent (ncu: the tensor pipe 40% busy, barrier waits the largest stall). Here (three partitions
of `gl.warp_specialize`):

- a one-warp producer streams 64-key tiles by TMA into a two-stage ring (tile i in stage i % 2) and
  refills a stage when both warpgroups have released it (an mbarrier of count 2);
- warpgroup E (the default partition) computes the scores of the even tiles, warpgroup O those of
  the odd tiles, each a full 64 x 64 tile over all 576 columns, with the softmax's row reductions
  inside the warpgroup: while one does its softmax, the other's MMAs run;
- E owns output columns 0-255, O columns 256-511. The running row max is handed on through shared
  memory (tile 2k: M = max(M_prev, rowmax), then tile 2k+1 starts from it), with each tile's P and
  its rescale factor alpha = exp(M_prev - M): the producer of a tile multiplies P by its own half of
  the latent from registers, the other warpgroup reads P from shared memory;
- P of a tile is written over that tile's RoPE slot (64 x 64, the same layout), which only the score
  MMA reads: Q (72 KB) and two 72 KB stages fill the 227 KB, so there is no room for P buffers;
- each warpgroup keeps the row sums of its own tiles, rescaled by both alphas, and the two are added
  at the end (as is the max: the last published one).

`applies` is `absorbed_decode_hopper.applies`; MLA_COMPILE_SEESAW=1 selects this kernel there.
"""

from __future__ import annotations

import os

import torch
import triton

from mla_compile.kernels import absorbed_decode_hopper as hopper

if hopper.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from mla_compile.kernels.absorbed_decode_hopper import _refill

R, DR, HALF = hopper.R, hopper.DR, hopper.HALF
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4            # the default partition (warpgroup E); O is a 4-warp worker, the producer 1 warp
WORKER_REGS = [232, 24]  # O, producer; E gets what maxnreg leaves (12 warps x 168 = 248 for E)
MAXNREG = 168
LOG2E = 1.4426950408889634


def enabled() -> bool:
    return os.environ.get("MLA_COMPILE_SEESAW") == "1"


if hopper.HAVE_GLUON:
    @gluon.jit
    def _scores(q_smem, qr_smem, lo, hi, kr, s_zero):
        s = warpgroup_mma(q_smem.index(0), lo.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(q_smem.index(1), hi.permute((1, 0)), s, is_async=True)
        return warpgroup_mma(qr_smem, kr.permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _probs(s, m_prev, n0, stop, scale, MASK, s_mt, MASK_KIND: gl.constexpr, BLOCK_N: gl.constexpr,
               col_layout: gl.constexpr):
        # x in natural units (finfo.min of an HF float mask stays finite), exp2 after subtracting;
        # a row that has seen only -inf keys keeps m = -inf and p = 0 (m_safe)
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=col_layout)
        valid = offs_n < stop
        x = s * scale
        if MASK_KIND == 1:
            valid = valid & (gl.load(MASK + offs_n * s_mt, mask=valid, other=0) != 0)
        if MASK_KIND == 2:
            x = x + gl.expand_dims(gl.load(MASK + offs_n * s_mt, mask=valid, other=0.0).to(gl.float32), 0)
        x = gl.where(gl.expand_dims(valid, 0), x, float("-inf"))
        m_new = gl.maximum(m_prev, gl.max(x, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2((m_prev - m_safe) * 1.4426950408889634)
        p = gl.exp2((x - gl.expand_dims(m_safe, 1)) * 1.4426950408889634)
        return p, alpha, m_new

    @gluon.jit
    def _producer(c_desc, kr_desc, lo_smem, hi_smem, kr_smem, full, empty, start, n_tiles, BLOCK_N: gl.constexpr,
                  NUM_STAGES: gl.constexpr):
        for i in range(2 * gl.cdiv(n_tiles, 2)):    # whole pairs: see _warpgroup
            s = i % NUM_STAGES
            mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)   # a fresh mbarrier passes phase 1 at once
            _refill(c_desc, kr_desc, full.index(s), lo_smem.index(s), hi_smem.index(s), kr_smem.index(s),
                    start + i * BLOCK_N, True)

    @gluon.jit
    def _warpgroup(q_smem, qr_smem, lo_smem, hi_smem, kr_smem, p_smem, full, empty, q_bar, p_bar, fin_bar, x_smem,
                   O, OP, ML, MASK, s_mt, scale, H, start, stop, n_tiles, row0, b, pid_p, splits, s_ob, s_oh,
                   ODD: gl.constexpr, ONE_SPLIT: gl.constexpr, MASK_KIND: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr, NUM_STAGES: gl.constexpr):
        # Warpgroup E (ODD False: scores of even tiles, output columns 0-255) or O (odd tiles, 256-511).
        # x_smem [8 x BLOCK_M] fp32, eight row vectors: 0/1 m, alpha of E's tile; 2/3 of O's; 4/5 the final l of E / O.
        # P of a tile goes over its RoPE slot where the shapes agree (BLOCK_N = 64), else to p_smem[E / O].
        dtype: gl.constexpr = q_smem.dtype
        P_IN_ROPE: gl.constexpr = BLOCK_N == kr_smem.type.shape[2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        MINE: gl.constexpr = 1 if ODD else 0
        OTHER: gl.constexpr = 1 - MINE

        m_run = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)   # the last published max
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK_M, HALF], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)
        if ODD:
            half = hi_smem
        else:
            half = lo_smem
        # n_tiles rounded up to pairs: the producer's last odd tile then lies past the valid length,
        # which TMA fills with zeros (no NaN for P V) and the softmax masks (p = 0, alpha = 1)
        for k in range(gl.cdiv(n_tiles, 2)):
            ph = k & 1
            se = (2 * k) % NUM_STAGES           # the stages of tiles 2k (E's) and 2k+1 (O's)
            so = (2 * k + 1) % NUM_STAGES
            phe = ((2 * k) // NUM_STAGES) & 1
            pho = ((2 * k + 1) // NUM_STAGES) & 1
            if P_IN_ROPE:
                pe = kr_smem.index(se)
                po = kr_smem.index(so)
            else:
                pe = p_smem.index(0)
                po = p_smem.index(1)
            if ODD:
                # O: its own scores (odd tile), then E's tile on its half while it does its softmax
                mbarrier.wait(full.index(so), pho)
                s_own = _scores(q_smem, qr_smem, lo_smem.index(so), hi_smem.index(so), kr_smem.index(so), s_zero)
                s_own = warpgroup_mma_wait(num_outstanding=0, deps=(s_own, ))
                mbarrier.wait(p_bar.index(0), ph)
                mbarrier.wait(full.index(se), phe)
                m_e = x_smem.slice(0, BLOCK_M).load(row_s)
                alpha_e = x_smem.slice(BLOCK_M, BLOCK_M).load(row_s)
                acc = warpgroup_mma(pe, half.index(se),
                                    acc * gl.expand_dims(gl.convert_layout(alpha_e, row_o), 1), is_async=True)
                p, alpha, m_new = _probs(s_own, m_e, start + (2 * k + 1) * BLOCK_N, stop, scale, MASK, s_mt,
                                         MASK_KIND, BLOCK_N, col_s)
                l_i = (l_i * alpha_e) * alpha + gl.sum(p, axis=1)
                po.store(p.to(dtype))
                x_smem.slice(2 * BLOCK_M, BLOCK_M).store(m_new)
                x_smem.slice(3 * BLOCK_M, BLOCK_M).store(alpha)
                fence_async_shared()
                if not P_IN_ROPE:   # E overwrites p_smem[0] once it has O's P: this read must be done by then
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(p_bar.index(1), count=1)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index(se), count=1)   # done with tile 2k: its stage refills meanwhile
                mbarrier.wait(p_bar.index(1), ph)     # every warp's P is in shared memory (the arrive came after all)
                acc = warpgroup_mma(po, half.index(so),
                                    acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1), is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                m_run = m_new
            else:
                mbarrier.wait(full.index(se), phe)
                s_own = _scores(q_smem, qr_smem, lo_smem.index(se), hi_smem.index(se), kr_smem.index(se), s_zero)
                s_own = warpgroup_mma_wait(num_outstanding=0, deps=(s_own, ))
                p, alpha, m_new = _probs(s_own, m_run, start + 2 * k * BLOCK_N, stop, scale, MASK, s_mt,
                                         MASK_KIND, BLOCK_N, col_s)
                l_i = l_i * alpha + gl.sum(p, axis=1)
                pe.store(p.to(dtype))
                x_smem.slice(0, BLOCK_M).store(m_new)
                x_smem.slice(BLOCK_M, BLOCK_M).store(alpha)
                fence_async_shared()
                mbarrier.arrive(p_bar.index(0), count=1)
                mbarrier.wait(p_bar.index(0), ph)
                acc = warpgroup_mma(pe, half.index(se),
                                    acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1), is_async=True)
                mbarrier.wait(p_bar.index(1), ph)
                mbarrier.wait(full.index(so), pho)
                m_o = x_smem.slice(2 * BLOCK_M, BLOCK_M).load(row_s)
                alpha_o = x_smem.slice(3 * BLOCK_M, BLOCK_M).load(row_s)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                fence_async_shared()
                mbarrier.arrive(empty.index(se), count=1)   # done with tile 2k: its stage refills meanwhile
                acc = warpgroup_mma(po, half.index(so),
                                    acc * gl.expand_dims(gl.convert_layout(alpha_o, row_o), 1), is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                l_i = l_i * alpha_o
                m_run = m_o
            # done with tile 2k+1 too (the P read from its slot included)
            fence_async_shared()
            mbarrier.arrive(empty.index(so), count=1)

        # the row sum is the two warpgroups' sums added; the max is the last published one (both have it)
        x_smem.slice((4 + MINE) * BLOCK_M, BLOCK_M).store(l_i)
        mbarrier.arrive(fin_bar, count=1)
        mbarrier.wait(fin_bar, 0)
        l_tot = l_i + x_smem.slice((4 + OTHER) * BLOCK_M, BLOCK_M).load(row_s)
        has = l_tot > 0
        inv = gl.convert_layout(1.0 / gl.where(has, l_tot, 1.0), row_o)
        rows = row0 + gl.arange(0, BLOCK_M, layout=row_o)
        cols = MINE * HALF + gl.arange(0, HALF, layout=col_o)
        ok = gl.expand_dims(rows < H, 1)
        o = acc * gl.expand_dims(inv, 1)
        if ONE_SPLIT:
            ptrs = O + b * s_ob + gl.expand_dims(rows, 1) * s_oh + gl.expand_dims(cols, 0)
            gl.store(ptrs, o.to(O.dtype.element_ty), mask=ok)
        else:
            base = (b * splits + pid_p) * H
            gl.store(OP + (base + gl.expand_dims(rows, 1)) * (2 * HALF) + gl.expand_dims(cols, 0), o, mask=ok)
            if not ODD:
                rows_s = row0 + gl.arange(0, BLOCK_M, layout=row_s)
                ml = ML + 2 * (base + rows_s)
                gl.store(ml, m_run, mask=rows_s < H)
                gl.store(ml + 1, l_tot, mask=rows_s < H)

    @gluon.jit
    def _seesaw_split_kernel(
        Q, QR, C, KR, MASK, KVLEN, O, OP, ML, scale, H, T, chunk, splits,
        s_qb, s_qh, s_rb, s_rh, s_cb, s_ct, s_kb, s_kt, s_mb, s_mt, s_ob, s_oh,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr, DR: gl.constexpr,
        MASK_KIND: gl.constexpr, HAS_KVLEN: gl.constexpr, ONE_SPLIT: gl.constexpr, NUM_STAGES: gl.constexpr = 2,
    ):
        dtype: gl.constexpr = C.dtype.element_ty
        pid_m = gl.program_id(0)
        pid_p = gl.program_id(1)
        b = gl.program_id(2).to(gl.int64)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF], dtype)
        qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DR], dtype)
        half_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF], dtype)
        rope_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DR], dtype)
        x_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

        t_end = T
        if HAS_KVLEN:
            t_end = gl.minimum(t_end, gl.load(KVLEN + b))
        q_desc = tma.make_tensor_descriptor(Q + b * s_qb, [H, 2 * HALF], [s_qh, 1], [BLOCK_M, HALF], q_sl)
        qr_desc = tma.make_tensor_descriptor(QR + b * s_rb, [H, DR], [s_rh, 1], [BLOCK_M, DR], qr_sl)
        c_desc = tma.make_tensor_descriptor(C + b * s_cb, [gl.maximum(t_end, 1), 2 * HALF], [s_ct, 1],
                                            [BLOCK_N, HALF], half_sl)
        kr_desc = tma.make_tensor_descriptor(KR + b * s_kb, [gl.maximum(t_end, 1), DR], [s_kt, 1],
                                             [BLOCK_N, DR], rope_sl)

        q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HALF], q_sl)
        qr_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, DR], qr_sl)
        lo_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HALF], half_sl)
        hi_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HALF], half_sl)
        kr_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, DR], rope_sl)
        # P over the RoPE slots where the shapes agree; else two small buffers (one allocation either way)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
        p_smem = gl.allocate_shared_memory(dtype, [2 if BLOCK_N != DR else 1, BLOCK_M, BLOCK_N], p_sl)
        x_smem = gl.allocate_shared_memory(gl.float32, [8 * BLOCK_M], x_sl)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        fin_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        p_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(fin_bar, count=2)
        for st in gl.static_range(NUM_STAGES):
            mbarrier.init(full.index(st), count=1)
            mbarrier.init(empty.index(st), count=2)
        for st in gl.static_range(2):
            mbarrier.init(p_bar.index(st), count=1)
        fence_async_shared()

        start = pid_p * chunk
        stop = gl.minimum(start + chunk, t_end)
        n_tiles = gl.maximum(gl.cdiv(stop - start, BLOCK_N), 0)
        row0 = pid_m * BLOCK_M
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + qr_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row0, 0], q_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [row0, HALF], q_bar, q_smem.index(1))
        tma.async_copy_global_to_shared(qr_desc, [row0, 0], q_bar, qr_smem)

        mask = MASK + b * s_mb
        gl.warp_specialize([
            (_warpgroup, (q_smem, qr_smem, lo_smem, hi_smem, kr_smem, p_smem, full, empty, q_bar, p_bar, fin_bar,
                          x_smem, O, OP, ML, mask, s_mt, scale, H, start, stop, n_tiles, row0, b, pid_p, splits, s_ob,
                          s_oh, False, ONE_SPLIT, MASK_KIND, BLOCK_M, BLOCK_N, HALF, NUM_STAGES)),
            (_warpgroup, (q_smem, qr_smem, lo_smem, hi_smem, kr_smem, p_smem, full, empty, q_bar, p_bar, fin_bar,
                          x_smem, O, OP, ML, mask, s_mt, scale, H, start, stop, n_tiles, row0, b, pid_p, splits, s_ob,
                          s_oh, True, ONE_SPLIT, MASK_KIND, BLOCK_M, BLOCK_N, HALF, NUM_STAGES)),
            (_producer, (c_desc, kr_desc, lo_smem, hi_smem, kr_smem, full, empty, start, n_tiles, BLOCK_N,
                         NUM_STAGES)),
    ], [4, 1], [232, 24])   # O, producer (see WORKER_REGS)


def _consts(mask_kind: int, has_kvlen: bool, one_split: bool) -> dict:
    # MLA_COMPILE_SEESAW_TILE=32: 32-key tiles in a four-stage ring (A/B against 64-key tiles in two)
    block_n = int(os.environ.get("MLA_COMPILE_SEESAW_TILE", "64"))
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=block_n, HALF=HALF, DR=DR, MASK_KIND=mask_kind, HAS_KVLEN=has_kvlen,
                ONE_SPLIT=one_split, NUM_STAGES=2 if block_n == 64 else 4)


def compile_for_sm90(mask_kind: int = 1, has_kvlen: bool = True, one_split: bool = False):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    consts = _consts(mask_kind, has_kvlen, one_split)
    names = [n for n in _seesaw_split_kernel.arg_names if n not in consts]
    mask_type = {0: "*bf16", 1: "*u8", 2: "*bf16"}[mask_kind]
    types = ["*bf16"] * 4 + [mask_type, "*i32", "*bf16", "*fp32", "*fp32", "fp32"] + ["i32"] * 16
    sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(9)}
    src = GluonASTSource(_seesaw_split_kernel, sig, consts, aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})


def seesaw_split_attention(q_lat, q_rope, c, kr, mask_kind: int, mask, mask_strides, kv_lens, out, o_part, ml,
                           scale: float, chunk: int, splits: int) -> None:
    """`absorbed_decode_hopper.hopper_split_attention`'s arguments and outputs."""
    B, H, _, _ = q_lat.shape
    T = c.shape[1]
    hopper.ensure_allocator()
    _seesaw_split_kernel[(triton.cdiv(H, BLOCK_M), splits, B)](
        q_lat, q_rope, c, kr, mask if mask is not None else c, kv_lens if kv_lens is not None else c,
        out, o_part, ml, float(scale), H, T, chunk, splits,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        c.stride(0), c.stride(1), kr.stride(0), kr.stride(1), mask_strides[0], mask_strides[2],
        out.stride(0), out.stride(1),
        **_consts(mask_kind, kv_lens is not None, splits == 1),
        num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
