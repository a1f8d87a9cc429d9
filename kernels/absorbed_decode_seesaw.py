"""The heads-major Hopper split kernel on FlashMLA's schedule: two warpgroups, alternate key tiles,
loads and score MMAs in 64-column pieces.

Same math, inputs and outputs as `absorbed_decode._absorbed_split_kernel` (see that module's
docstring), for a Hopper GPU at more than 32 heads, heads as the MMA's rows (64-row tiles). As in
FlashMLA's `splitkv_mla.cuh` (sm90 dense decode), per pair of tiles (2k in stage 0, 2k+1 in stage 1):

- warpgroup E (the default partition) computes the scores of tile 2k, warpgroup O (a 4-warp worker)
  those of tile 2k+1, each a full 64 x 64 wgmma: Q is read once per tile, not twice;
- E owns output columns 0-255, O columns 256-511. The running row max goes E -> O through shared
  memory with each tile's rescale factor; E multiplies its P by its half of tile 2k's latent from
  registers (no shared memory for A), O likewise with tile 2k+1; each then reads the other's P from
  shared memory (O's P over the RoPE slot of Q, whose values both warpgroups hold in registers: Q,
  two 72 KB stages and E's P fill the 227 KB);
- a tile is loaded as nine 64-column pieces (eight of the latent, one RoPE), one mbarrier each: the
  score MMA starts on the first piece to land, and each piece is refilled as soon as its last reader
  is done (pieces 0-3, E's half, by E; 4-8 by O), so the next pair streams in during this one;
- the four hand-offs (E's scale ready, O's scale ready, E's P ready, O's P issued) are mbarriers of
  count 1 that complete once a pair (a 4-warp partition arrives from one thread after a partition
  barrier), FlashMLA's named barriers;
- each warpgroup keeps the row sums of its own tiles, rescaled by both factors; the two are added
  at the end. A pair's second tile past the split's end (an odd tile count) is masked to nothing.

`takes_sizes` says when it runs (with a Hopper GPU and TMA-compatible strides, `sm90.tma_ready`);
`kernels/registry.absorbed_core` asks it. Measured figures: docs/performance.md; the schedules
measured and not kept: docs/design.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mla_compile.kernels import sm90

if sm90.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from mla_compile.kernels.sm90 import _probs, _tma_load

R, DR, HALF = sm90.R, sm90.DR, sm90.HALF
MIN_HEADS = 33    # at most 32 heads: the keys-major kernel
BLOCK_M = 64
BLOCK_N = 64
# a key tile arrives as nine 64-column TMA pieces (128 bytes, the swizzle's width): eight of the
# latent, then the RoPE part
NUM_WARPS = 4              # warpgroup E (the default partition); O is a 4-warp worker
WORKER_REGS = tl.constexpr(248)   # O's registers (setmaxnreg); E gets MAXNREG
MAXNREG = 248

# rows of the fp32 vector scratch (vec_smem [VEC_ROWS * BLOCK_M], a row a BLOCK_M slice): the running
# max, each warpgroup's rescale factor of this pair, each one's final row sum (constexpr: read inside
# the kernels)
V_M, V_SCALE_E, V_SCALE_O, V_L_E, V_L_O = (tl.constexpr(i) for i in range(5))
VEC_ROWS = tl.constexpr(8)
# the hand-off mbarriers (sync [SYNCS, 1]): E's scale ready, O's scale ready, E's P ready, O's P
# issued, both row sums stored
S_SCALE_E, S_SCALE_O, S_P_E, S_P_O, S_FIN = (tl.constexpr(i) for i in range(5))
SYNCS = tl.constexpr(8)   # 5 used (power-of-2 shapes)


def takes_sizes(dtype: torch.dtype, H, S, r, dr, is_causal: bool) -> bool:
    """The sizes and dtypes it takes (fake tensors can be asked): bf16/fp16, r = 512, dr = 64, one query
    position, more than 32 heads (fewer go to the keys-major kernel, which pads nothing there), not
    causal."""
    return (not is_causal and S == 1 and r == R and dr == DR and dtype in (torch.bfloat16, torch.float16)
            and H >= MIN_HEADS)


if sm90.HAVE_GLUON:
    @gluon.jit
    def _load_pieces(c_desc, kr_desc, bars, STAGE: gl.constexpr, lo, hi, kr, key0, FIRST: gl.constexpr,
                     LAST: gl.constexpr, pred):
        # pieces FIRST..LAST-1 of one key tile (0-3 the latent's low half, 4-7 its high half, 8 the RoPE
        # part), each on its own mbarrier
        for j in gl.static_range(FIRST, LAST):
            bar = bars.index(16 * STAGE + j)
            if j < 8:
                mbarrier.expect(bar, c_desc.block_type.nbytes, pred=pred)
            else:
                mbarrier.expect(bar, kr_desc.block_type.nbytes, pred=pred)
            if j < 4:
                _tma_load(c_desc, [key0, j * 64], bar, lo.slice(j * 64, 64, dim=1), pred=pred)
            elif j < 8:
                _tma_load(c_desc, [key0, j * 64], bar, hi.slice((j - 4) * 64, 64, dim=1), pred=pred)
            else:
                _tma_load(kr_desc, [key0, 0], bar, kr, pred=pred)

    @gluon.jit
    def _score_piece(q0, q1, qr_reg, lo, hi, kr, bars, STAGE: gl.constexpr, phase, s, J: gl.constexpr,
                     USE_ACC: gl.constexpr):
        mbarrier.wait(bars.index(16 * STAGE + J), phase)
        if J < 4:
            s = warpgroup_mma(q0.slice(J * 64, 64, dim=1), lo.slice(J * 64, 64, dim=1).permute((1, 0)),
                              s, use_acc=USE_ACC, is_async=True)
        elif J < 8:
            s = warpgroup_mma(q1.slice((J - 4) * 64, 64, dim=1),
                              hi.slice((J - 4) * 64, 64, dim=1).permute((1, 0)), s, use_acc=USE_ACC, is_async=True)
        else:
            s = warpgroup_mma(qr_reg, kr.permute((1, 0)), s, use_acc=USE_ACC, is_async=True)
        return s

    @gluon.jit
    def _score_pieces(q0, q1, qr_reg, lo, hi, kr, bars, STAGE: gl.constexpr, phase, s, FIRST: gl.constexpr,
                      LAST: gl.constexpr, ZERO_FIRST: gl.constexpr):
        # S (+)= Q K^T over pieces FIRST..LAST-1 (mod 9), each issued as soon as its piece has landed;
        # one wgmma group a piece. Q's RoPE piece is the register operand qr_reg.
        s = _score_piece(q0, q1, qr_reg, lo, hi, kr, bars, STAGE, phase, s, FIRST % 9, not ZERO_FIRST)
        for jj in gl.static_range(FIRST + 1, LAST):
            s = _score_piece(q0, q1, qr_reg, lo, hi, kr, bars, STAGE, phase, s, jj % 9, True)
        return s

    @gluon.jit
    def _views(q_smem, lo_smem, hi_smem, kr_smem, z):
        # The two halves of Q and both stages' pieces, at index offset z. Inside the loops z = k >> 30,
        # which is 0 for any real pair count but which the compiler cannot prove: the 72 shared-memory
        # descriptors of a tile's score MMAs are then computed where they are used, each iteration,
        # rather than hoisted out of the loop, where they held 144 registers and made ptxas spill.
        return (q_smem.index(z), q_smem.index(z + 1), lo_smem.index(z), hi_smem.index(z), kr_smem.index(z),
                lo_smem.index(z + 1), hi_smem.index(z + 1), kr_smem.index(z + 1))

    @gluon.jit
    def _write_out(acc, l_tot, m_fin, O, OP, ML, H, row0, b, pid_p, splits, s_ob, s_oh, COL0: gl.constexpr,
                   WRITE_ML: gl.constexpr, ONE_SPLIT: gl.constexpr, BLOCK_M: gl.constexpr, HALF: gl.constexpr,
                   o_layout: gl.constexpr, row_s: gl.constexpr):
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        has = l_tot > 0   # a split with no key (l = 0, m = -inf) writes zeros, which the merge weighs as nothing
        inv = gl.convert_layout(1.0 / gl.where(has, l_tot, 1.0), row_o)
        rows = row0 + gl.arange(0, BLOCK_M, layout=row_o)
        cols = COL0 + gl.arange(0, HALF, layout=col_o)
        ok = gl.expand_dims(rows < H, 1)
        o = acc * gl.expand_dims(inv, 1)
        if ONE_SPLIT:
            ptrs = O + b * s_ob + gl.expand_dims(rows, 1) * s_oh + gl.expand_dims(cols, 0)
            gl.store(ptrs, o.to(O.dtype.element_ty), mask=ok)
        else:
            base = (b * splits + pid_p) * H
            gl.store(OP + (base + gl.expand_dims(rows, 1)) * (2 * HALF) + gl.expand_dims(cols, 0), o, mask=ok)
            if WRITE_ML:
                rows_s = row0 + gl.arange(0, BLOCK_M, layout=row_s)
                ml = ML + 2 * (base + rows_s)
                gl.store(ml, m_fin, mask=rows_s < H)
                gl.store(ml + 1, l_tot, mask=rows_s < H)

    # the MMA layouts of one warpgroup (4 warps): a 64 x 64 score tile and a 64 x 256 output half
    S_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16]))
    O_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, HALF, 16]))
    # and the layouts both warpgroups derive from them: a score tile's rows and columns, the output's
    # rows, and P as the A operand of the P V MMA
    ROW_S = gl.constexpr(gl.SliceLayout(1, S_LAYOUT))
    COL_S = gl.constexpr(gl.SliceLayout(0, S_LAYOUT))
    ROW_O = gl.constexpr(gl.SliceLayout(1, O_LAYOUT))
    A_O = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2))

    @gluon.jit
    def _warpgroup_start(q_smem, qr_smem, lo_smem, hi_smem, kr_smem, kbar, q_bar, STAGE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         HALF: gl.constexpr):
        # Both warpgroups' start: Q's RoPE piece into registers (the A operand of its score MMA), a zero
        # output half and row sums, and the scores of the first tile of this warpgroup's stage.
        mbarrier.wait(q_bar, 0)
        qr_reg = qr_smem.load(gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT, k_width=2))
        acc = gl.zeros([BLOCK_M, HALF], gl.float32, layout=O_LAYOUT)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_S)
        s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_LAYOUT)
        s = _score_pieces(q_smem.index(0), q_smem.index(1), qr_reg, lo_smem.index(STAGE), hi_smem.index(STAGE),
                          kr_smem.index(STAGE), kbar, STAGE, 0, s, 0, 9, True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        return qr_reg, acc, l_i, s

    @gluon.jit
    def _even_warpgroup(q_smem, qr_smem, lo_smem, hi_smem, kr_smem, pe_smem, vec_smem, kbar, sync, q_bar,
                        c_desc, kr_desc, O, OP, ML, MASK, s_mt, scale, H, start, stop, n_pairs, row0, b, pid_p,
                        splits, s_ob, s_oh, ONE_SPLIT: gl.constexpr, MASK_KIND: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr):
        # Warpgroup E: scores of the even tiles (stage 0), output columns 0-255 (the latent's low half,
        # pieces 0-3 of each stage, which E refills).
        dtype: gl.constexpr = q_smem.dtype
        qr_reg, acc, l_i, s = _warpgroup_start(q_smem, qr_smem, lo_smem, hi_smem, kr_smem, kbar, q_bar, 0,
                                               BLOCK_M, BLOCK_N, HALF)
        for k in range(n_pairs):
            q0, q1, lo0, hi0, kr0, lo1, hi1, kr1 = _views(q_smem, lo_smem, hi_smem, kr_smem, k >> 30)
            ph = k & 1
            has_next = k + 1 < n_pairs
            m_prev = vec_smem.slice(V_M * BLOCK_M, BLOCK_M).load(ROW_S)
            p, alpha, m_new = _probs(s, m_prev, start + 2 * k * BLOCK_N, stop, scale, MASK, s_mt, MASK_KIND,
                                     BLOCK_N, COL_S)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            vec_smem.slice(V_SCALE_E * BLOCK_M, BLOCK_M).store(alpha)
            vec_smem.slice(V_M * BLOCK_M, BLOCK_M).store(m_new)
            mbarrier.arrive(sync.index(S_SCALE_E), count=1)
            # P_2k V_2k on the low half, P from registers (in units of m_new; rescaled below by O's factor)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_O), 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), A_O), lo0, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.wait(sync.index(S_SCALE_O), ph)
            # stage 0's low half is free (tile 2k's scores and P V there done): tile 2k+2's pieces 0-3
            _load_pieces(c_desc, kr_desc, kbar, 0, lo0, hi0, kr0, start + (2 * k + 2) * BLOCK_N, 0, 4, has_next)
            alpha_o = vec_smem.slice(V_SCALE_O * BLOCK_M, BLOCK_M).load(ROW_S)
            pe_smem.store((p * gl.expand_dims(alpha_o, 1)).to(dtype))
            fence_async_shared()
            mbarrier.arrive(sync.index(S_P_E), count=1)
            l_i = l_i * alpha_o
            acc = acc * gl.expand_dims(gl.convert_layout(alpha_o, ROW_O), 1)
            mbarrier.wait(sync.index(S_P_O), ph)
            # P_2k+1 (O's, over Q's RoPE slot) V_2k+1 on the low half
            pv = warpgroup_mma(qr_smem, lo1, acc, is_async=True)
            if has_next:
                s = _score_pieces(q0, q1, qr_reg, lo0, hi0, kr0, kbar, 0, ph ^ 1, s, 0, 4, True)
                acc = warpgroup_mma_wait(num_outstanding=4, deps=(pv, ))
                # stage 1's low half is free: tile 2k+3's pieces 0-3
                _load_pieces(c_desc, kr_desc, kbar, 1, lo1, hi1, kr1, start + (2 * k + 3) * BLOCK_N, 0, 4, True)
                s = _score_pieces(q0, q1, qr_reg, lo0, hi0, kr0, kbar, 0, ph ^ 1, s, 4, 9, False)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))

        vec_smem.slice(V_L_E * BLOCK_M, BLOCK_M).store(l_i)
        mbarrier.arrive(sync.index(S_FIN), count=1)
        mbarrier.wait(sync.index(S_FIN), 0)
        l_tot = l_i + vec_smem.slice(V_L_O * BLOCK_M, BLOCK_M).load(ROW_S)
        _write_out(acc, l_tot, l_tot, O, OP, ML, H, row0, b, pid_p, splits, s_ob, s_oh, 0, False, ONE_SPLIT,
                   BLOCK_M, HALF, O_LAYOUT, ROW_S)

    @gluon.jit
    def _odd_warpgroup(q_smem, qr_smem, lo_smem, hi_smem, kr_smem, pe_smem, vec_smem, kbar, sync, q_bar,
                       c_desc, kr_desc, O, OP, ML, MASK, s_mt, scale, H, start, stop, n_pairs, row0, b, pid_p,
                       splits, s_ob, s_oh, ONE_SPLIT: gl.constexpr, MASK_KIND: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr):
        # Warpgroup O: scores of the odd tiles (stage 1), output columns 256-511 (the latent's high half
        # and the RoPE piece, pieces 4-8 of each stage, which O refills).
        dtype: gl.constexpr = q_smem.dtype
        qr_reg, acc, l_i, s = _warpgroup_start(q_smem, qr_smem, lo_smem, hi_smem, kr_smem, kbar, q_bar, 1,
                                               BLOCK_M, BLOCK_N, HALF)
        m_new = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=ROW_S)
        for k in range(n_pairs):
            q0, q1, lo0, hi0, kr0, lo1, hi1, kr1 = _views(q_smem, lo_smem, hi_smem, kr_smem, k >> 30)
            ph = k & 1
            has_next = k + 1 < n_pairs
            mbarrier.wait(sync.index(S_SCALE_E), ph)
            m_e = vec_smem.slice(V_M * BLOCK_M, BLOCK_M).load(ROW_S)
            alpha_e = vec_smem.slice(V_SCALE_E * BLOCK_M, BLOCK_M).load(ROW_S)
            p, alpha, m_new = _probs(s, m_e, start + (2 * k + 1) * BLOCK_N, stop, scale, MASK, s_mt, MASK_KIND,
                                     BLOCK_N, COL_S)
            vec_smem.slice(V_SCALE_O * BLOCK_M, BLOCK_M).store(alpha)
            vec_smem.slice(V_M * BLOCK_M, BLOCK_M).store(m_new)
            mbarrier.arrive(sync.index(S_SCALE_O), count=1)
            f = alpha_e * alpha
            l_i = l_i * f + gl.sum(p, axis=1)
            acc = acc * gl.expand_dims(gl.convert_layout(f, ROW_O), 1)
            pb = p.to(dtype)
            # Q's RoPE slot is free: both warpgroups hold it in registers, and E's last read of the
            # previous P there finished before E signalled this pair's scale
            qr_smem.store(pb)
            acc = warpgroup_mma(gl.convert_layout(pb, A_O), hi1, acc, is_async=True)
            fence_async_shared()
            mbarrier.wait(sync.index(S_P_E), ph)
            acc = warpgroup_mma(pe_smem, hi0, acc, is_async=True)
            mbarrier.arrive(sync.index(S_P_O), count=1)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # stage 1's high half and RoPE piece are free: tile 2k+3's pieces 4-8
            _load_pieces(c_desc, kr_desc, kbar, 1, lo1, hi1, kr1, start + (2 * k + 3) * BLOCK_N, 4, 9, has_next)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            # stage 0's too (E's scores of tile 2k and this P V on it done): tile 2k+2's pieces 4-8
            _load_pieces(c_desc, kr_desc, kbar, 0, lo0, hi0, kr0, start + (2 * k + 2) * BLOCK_N, 4, 9, has_next)
            if has_next:
                s = _score_pieces(q0, q1, qr_reg, lo1, hi1, kr1, kbar, 1, ph ^ 1, s, 4, 13, True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

        vec_smem.slice(V_L_O * BLOCK_M, BLOCK_M).store(l_i)
        mbarrier.arrive(sync.index(S_FIN), count=1)
        mbarrier.wait(sync.index(S_FIN), 0)
        l_tot = l_i + vec_smem.slice(V_L_E * BLOCK_M, BLOCK_M).load(ROW_S)
        _write_out(acc, l_tot, m_new, O, OP, ML, H, row0, b, pid_p, splits, s_ob, s_oh, HALF, True, ONE_SPLIT,
                   BLOCK_M, HALF, O_LAYOUT, ROW_S)

    @gluon.jit
    def _seesaw_split_kernel(
        Q, QR, C, KR, MASK, KVLEN, O, OP, ML, scale, H, T, chunk, splits,
        s_qb, s_qh, s_rb, s_rh, s_cb, s_ct, s_kb, s_kt, s_mb, s_mt, s_ob, s_oh,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr, DR: gl.constexpr,
        MASK_KIND: gl.constexpr, HAS_KVLEN: gl.constexpr, ONE_SPLIT: gl.constexpr,
    ):
        dtype: gl.constexpr = C.dtype.element_ty
        pid_m = gl.program_id(0)
        pid_p = gl.program_id(1)
        b = gl.program_id(2).to(gl.int64)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF], dtype)
        qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DR], dtype)
        half_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF], dtype)
        piece_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], dtype)
        rope_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DR], dtype)
        vec_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

        t_end = T
        if HAS_KVLEN:
            t_end = gl.minimum(t_end, gl.load(KVLEN + b))
        # the latent's rows past the valid length read as zeros (no NaN from a static cache's tail)
        q_desc = tma.make_tensor_descriptor(Q + b * s_qb, [H, 2 * HALF], [s_qh, 1], [BLOCK_M, HALF], q_sl)
        qr_desc = tma.make_tensor_descriptor(QR + b * s_rb, [H, DR], [s_rh, 1], [BLOCK_M, DR], qr_sl)
        c_desc = tma.make_tensor_descriptor(C + b * s_cb, [gl.maximum(t_end, 1), 2 * HALF], [s_ct, 1],
                                            [BLOCK_N, 64], piece_sl)
        kr_desc = tma.make_tensor_descriptor(KR + b * s_kb, [gl.maximum(t_end, 1), DR], [s_kt, 1],
                                             [BLOCK_N, DR], rope_sl)

        q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HALF], q_sl)
        qr_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, DR], qr_sl)   # Q's RoPE part, then O's P
        lo_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HALF], half_sl)
        hi_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HALF], half_sl)
        kr_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, DR], rope_sl)
        pe_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], qr_sl)   # E's P
        vec_smem = gl.allocate_shared_memory(gl.float32, [VEC_ROWS * BLOCK_M], vec_sl)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        # stage st, piece j: mbarrier 16 * st + j (power-of-two shapes; 9 used a stage)
        kbar = gl.allocate_shared_memory(gl.int64, [32, 1], mbarrier.MBarrierLayout())
        sync = gl.allocate_shared_memory(gl.int64, [SYNCS, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for st in gl.static_range(2):
            for j in gl.static_range(9):
                mbarrier.init(kbar.index(16 * st + j), count=1)
        for j in gl.static_range(SYNCS):
            mbarrier.init(sync.index(j), count=2 if j == S_FIN else 1)
        init_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        vec_smem.slice(V_M * BLOCK_M, BLOCK_M).store(gl.full([BLOCK_M], float("-inf"), gl.float32, layout=init_layout))
        fence_async_shared()

        start = pid_p * chunk
        stop = gl.minimum(start + chunk, t_end)
        n_pairs = gl.maximum(gl.cdiv(stop - start, 2 * BLOCK_N), 0)
        row0 = pid_m * BLOCK_M
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + qr_desc.block_type.nbytes)
        _tma_load(q_desc, [row0, 0], q_bar, q_smem.index(0))
        _tma_load(q_desc, [row0, HALF], q_bar, q_smem.index(1))
        _tma_load(qr_desc, [row0, 0], q_bar, qr_smem)
        # the first pair (both warpgroups score it before their loops; past t_end TMA reads zeros)
        _load_pieces(c_desc, kr_desc, kbar, 0, lo_smem.index(0), hi_smem.index(0), kr_smem.index(0),
                     start, 0, 9, True)
        _load_pieces(c_desc, kr_desc, kbar, 1, lo_smem.index(1), hi_smem.index(1), kr_smem.index(1),
                     start + BLOCK_N, 0, 9, True)

        mask = MASK + b * s_mb
        gl.warp_specialize([
            (_even_warpgroup, (q_smem, qr_smem, lo_smem, hi_smem, kr_smem, pe_smem, vec_smem, kbar, sync, q_bar,
                               c_desc, kr_desc, O, OP, ML, mask, s_mt, scale, H, start, stop, n_pairs, row0, b,
                               pid_p, splits, s_ob, s_oh, ONE_SPLIT, MASK_KIND, BLOCK_M, BLOCK_N, HALF)),
            (_odd_warpgroup, (q_smem, qr_smem, lo_smem, hi_smem, kr_smem, pe_smem, vec_smem, kbar, sync, q_bar,
                              c_desc, kr_desc, O, OP, ML, mask, s_mt, scale, H, start, stop, n_pairs, row0, b,
                              pid_p, splits, s_ob, s_oh, ONE_SPLIT, MASK_KIND, BLOCK_M, BLOCK_N, HALF)),
        ], [4], [WORKER_REGS])


def _consts(mask_kind: int, has_kvlen: bool, one_split: bool) -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HALF=HALF, DR=DR, MASK_KIND=mask_kind, HAS_KVLEN=has_kvlen,
                ONE_SPLIT=one_split)


def compile_for_sm90(mask_kind: int = 1, has_kvlen: bool = True, one_split: bool = False):
    """Compile ahead of time for sm_90 (no GPU needed); see `sm90.compile_gluon_for_sm90`."""
    return sm90.compile_gluon_for_sm90(_seesaw_split_kernel, _consts(mask_kind, has_kvlen, one_split), mask_kind,
                                       num_warps=NUM_WARPS, maxnreg=MAXNREG)


def seesaw_split_attention(q_lat, q_rope, c, kr, mask_kind: int, mask, mask_strides, kv_lens, out, o_part, ml,
                           scale: float, chunk: int, splits: int, one_split: bool | None = None) -> None:
    """Launch it; the arguments and outputs are `sm90.launch_split`'s. one_split (default: splits == 1)
    writes `out` directly; False writes o_part and ml for the merge even with one split (sinks)."""
    B, H = q_lat.shape[:2]
    one = splits == 1 if one_split is None else one_split
    sm90.launch_split(_seesaw_split_kernel, (triton.cdiv(H, BLOCK_M), splits, B), q_lat, q_rope, c, kr, mask,
                      mask_strides, kv_lens, out, o_part, ml, scale, chunk, splits,
                      **_consts(mask_kind, kv_lens is not None, one), num_warps=NUM_WARPS, maxnreg=MAXNREG)
