"""Experiment: the absorbed split kernel written in Gluon, hand-pipelined for Hopper (sm_90).

    python benchmarks/gluon_absorbed.py                 # check + time on the GPU (H200)
    python benchmarks/gluon_absorbed.py --compile-only  # compile each variant for sm_90, no GPU needed

Not part of the backend. The production Triton kernel (`kernels/absorbed_decode._absorbed_split_kernel`)
is 1.54x slower than FlashMLA at H=128, B=8, T=4096 on an H200: ncu shows one CTA per SM, 8 warps,
latency bound, no overlap between the softmax and the tensor-core MMAs. Gluon (Triton's low-level
dialect, `triton.experimental.gluon`, written against triton 3.6.0) lets us place the shared memory,
the TMA loads, the mbarriers and the async wgmma waits by hand, FlashMLA style.

Same math, same split/merge scheme as production: grid (H / 64 row tiles, splits, B); each program
takes 64 rows (heads) and keys [p * chunk, min((p + 1) * chunk, T)), and writes o_part = acc / l (fp32)
and lse = m + log(l) in the production layout, which the production `merge_splits` then merges.

Design (both variants):
- 8 warps = 2 warpgroups; every MMA layout is warps_per_cta [4, 2], so the warpgroups split the N
  side: the 64x512 fp32 accumulator (two 64x256 halves, the latent is loaded as two 256-wide TMA
  boxes) gives each warpgroup 64x256 (128 registers a thread), and S = Q K^T (64x64) 64x32 each.
- Q (64x512 as two halves + 64x64 rope) is TMA-loaded into shared memory once; latent + rope tiles of
  BLOCK_N keys come by TMA into a NUM_STAGES ring, one mbarrier a stage (64 keys x 2 stages, or
  32 keys x 4 stages: the same 144 KB, prefetched in smaller pieces). The same tile is the K operand of
  Q K^T (a permuted view) and the V operand of P V. Descriptors are made on the device per batch with
  the valid length T as their row count, so TMA zero-fills past T; keys of the next split inside a
  tile are masked with `stop`.
- P goes through shared memory (8 KB, what is left of the 227 KB after Q and the stages): each
  warpgroup holds half of P's columns but needs all of them as the A operand of its P V half.

Variants (each at BN=64 st=2 and BN=32 st=4):
- `serial`: per tile wait -> Q K^T -> softmax -> P V -> refill the stage. No overlap inside a CTA,
  only the TMA prefetch of the next tile.
- `overlap`: FA3's intra-warpgroup pipelining. Issue the async wgmma for S_{i+1} = Q K_{i+1}^T, then
  P_i V_i; wait for S_{i+1} only (P_i V_i keeps running on the tensor cores) and do the softmax of
  S_{i+1} meanwhile; then wait for P_i V_i, rescale, refill the stage.

Each variant is checked against the production kernel's output, then timed (CUDA-graph replay, as
absorbed_experiments.py does) beside FlashMLA where it is installed. Prints one table; writes it to
benchmarks/results/gluon-absorbed-<device>.md (and to $OUT if set).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mla_compile.kernels.absorbed_decode import (  # noqa: E402
    absorbed_latent_attention, block_m_for, choose_splits, merge_splits)

R, DR = 512, 64
HALF = R // 2          # a TMA box side is at most 256 elements: the 512-wide latent is two boxes
BLOCK_M = 64           # rows (heads) a program
NUM_WARPS = 8          # two warpgroups
DT = torch.bfloat16
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# name -> (PIPELINE, BLOCK_N keys a tile, NUM_STAGES of the key ring); 64 keys x 2 stages is what fits
# beside Q with 64-key tiles, 32 x 4 prefetches as many keys in smaller, earlier-ready pieces.
VARIANTS = {"serial BN=64 st=2": (False, 64, 2), "overlap BN=64 st=2": (True, 64, 2),
            "serial BN=32 st=4": (False, 32, 4), "overlap BN=32 st=4": (True, 32, 4)}


@gluon.jit
def _softmax_step(qk, m_i, l_i, n0, stop, qk_scale,
                  BLOCK_N: gl.constexpr, col_layout: gl.constexpr):
    # Online softmax in the exp2 domain (qk_scale = scale * log2 e). Every tile holds at least one key
    # < stop, so m_new is finite and alpha = exp2(-inf) = 0 on the first tile.
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=col_layout)
    x = gl.where(gl.expand_dims(offs_n < stop, 0), qk * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(x, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(x - gl.expand_dims(m_new, 1))
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p.to(gl.bfloat16), alpha, m_new, l_new


@gluon.jit
def _refill(c_desc, kr_desc, bar, lo, hi, kr, key0, pred):
    # One stage = two latent halves + the rope tile, all on one mbarrier.
    mbarrier.expect(bar, 2 * c_desc.block_type.nbytes + kr_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(c_desc, [key0, 0], bar, lo, pred=pred)
    tma.async_copy_global_to_shared(c_desc, [key0, c_desc.block_type.shape[1]], bar, hi, pred=pred)
    tma.async_copy_global_to_shared(kr_desc, [key0, 0], bar, kr, pred=pred)


@gluon.jit
def _gluon_split_kernel(
    Q, QR, C, KR, OP, LSE, qk_scale, H, T, chunk, splits,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr, DR: gl.constexpr,
    PIPELINE: gl.constexpr, NUM_STAGES: gl.constexpr,
):
    pid_m = gl.program_id(0)
    pid_p = gl.program_id(1)
    b = gl.program_id(2)
    n_batch = gl.num_programs(2)
    b64 = b.to(gl.int64)

    # warps [4, 2]: the two warpgroups split N (FlashMLA's column split of O); m16 n k16 for bf16.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BLOCK_N // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, HALF // 2, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF], gl.bfloat16)
    qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DR], gl.bfloat16)
    half_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF], gl.bfloat16)
    rope_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DR], gl.bfloat16)
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.bfloat16)

    # Device-side descriptors: the latent's is per batch with T rows, so TMA zero-fills keys >= T
    # (an unwritten cache's garbage never reaches P V) instead of reading the next batch.
    q_desc = tma.make_tensor_descriptor(Q, [n_batch * H, 2 * HALF], [2 * HALF, 1], [BLOCK_M, HALF], q_sl)
    qr_desc = tma.make_tensor_descriptor(QR, [n_batch * H, DR], [DR, 1], [BLOCK_M, DR], qr_sl)
    c_desc = tma.make_tensor_descriptor(C + b64 * T * (2 * HALF), [T, 2 * HALF], [2 * HALF, 1],
                                        [BLOCK_N, HALF], half_sl)
    kr_desc = tma.make_tensor_descriptor(KR + b64 * T * DR, [T, DR], [DR, 1], [BLOCK_N, DR], rope_sl)

    # 72 KB of Q + 2 x 72 KB stages (64 keys) + 8 KB of P = 224 KB of the 227 KB; 4 x 36 KB for 32 keys.
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, HALF], q_sl)
    qr_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, DR], qr_sl)
    lo_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, HALF], half_sl)
    hi_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, HALF], half_sl)
    kr_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, DR], rope_sl)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, BLOCK_N], p_sl)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(NUM_STAGES):
        mbarrier.init(kv_bar.index(st), count=1)
    fence_async_shared()   # the barrier inits must be visible to the TMA unit before the first copy

    start = pid_p * chunk
    stop = gl.minimum(start + chunk, T)
    n_tiles = gl.cdiv(stop - start, BLOCK_N)   # >= 1: splits = cdiv(T, chunk), so start < T

    # Q once, then the first NUM_STAGES key tiles, all in flight together.
    row0 = b * H + pid_m * BLOCK_M
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + qr_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row0, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [row0, HALF], q_bar, q_smem.index(1))
    tma.async_copy_global_to_shared(qr_desc, [row0, 0], q_bar, qr_smem)
    for st in gl.static_range(NUM_STAGES):
        _refill(c_desc, kr_desc, kv_bar.index(st), lo_smem.index(st), hi_smem.index(st), kr_smem.index(st),
                start + st * BLOCK_N, st < n_tiles)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc_lo = gl.zeros([BLOCK_M, HALF], gl.float32, layout=o_layout)
    acc_hi = gl.zeros([BLOCK_M, HALF], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)

    if PIPELINE:
        # Prologue: S_0 and its softmax.
        mbarrier.wait(kv_bar.index(0), 0)
        qk = warpgroup_mma(q_smem.index(0), lo_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        qk = warpgroup_mma(q_smem.index(1), hi_smem.index(0).permute((1, 0)), qk, is_async=True)
        qk = warpgroup_mma(qr_smem, kr_smem.index(0).permute((1, 0)), qk, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, start, stop, qk_scale, BLOCK_N, col_s)
        # Steady state: tile i's P V overlaps the softmax of tile i + 1 (the last tile is peeled off
        # below, so the loop body never branches on "is there a next tile").
        for i in range(0, n_tiles - 1):
            s = i % NUM_STAGES
            nx = (i + 1) % NUM_STAGES
            # P_i to shared memory: P_{i-1} V_{i-1} was waited for and both warpgroups passed the
            # barrier after it, so nobody still reads p_smem.
            p_smem.store(p)
            fence_async_shared()
            gl.thread_barrier()
            alpha_o = gl.convert_layout(alpha, row_o)
            acc_lo = acc_lo * gl.expand_dims(alpha_o, 1)
            acc_hi = acc_hi * gl.expand_dims(alpha_o, 1)
            mbarrier.wait(kv_bar.index(nx), ((i + 1) // NUM_STAGES) & 1)
            # S_{i+1} first, then P_i V_i: wgmma groups retire in order, so waiting until two are
            # outstanding leaves exactly the P V pair running while the softmax of S_{i+1} runs.
            qk = warpgroup_mma(q_smem.index(0), lo_smem.index(nx).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)
            qk = warpgroup_mma(q_smem.index(1), hi_smem.index(nx).permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma(qr_smem, kr_smem.index(nx).permute((1, 0)), qk, is_async=True)
            acc_lo = warpgroup_mma(p_smem, lo_smem.index(s), acc_lo, is_async=True)
            acc_hi = warpgroup_mma(p_smem, hi_smem.index(s), acc_hi, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=2, deps=(qk, ))
            p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, start + (i + 1) * BLOCK_N, stop, qk_scale,
                                               BLOCK_N, col_s)
            acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, acc_hi))
            # Both warpgroups are done with stage s (its Q K^T long ago, its P V just now): refill it.
            gl.thread_barrier()
            _refill(c_desc, kr_desc, kv_bar.index(s), lo_smem.index(s), hi_smem.index(s), kr_smem.index(s),
                    start + (i + NUM_STAGES) * BLOCK_N, i + NUM_STAGES < n_tiles)
        # Last tile: P V only.
        s = (n_tiles - 1) % NUM_STAGES
        p_smem.store(p)
        fence_async_shared()
        gl.thread_barrier()
        alpha_o = gl.convert_layout(alpha, row_o)
        acc_lo = acc_lo * gl.expand_dims(alpha_o, 1)
        acc_hi = acc_hi * gl.expand_dims(alpha_o, 1)
        acc_lo = warpgroup_mma(p_smem, lo_smem.index(s), acc_lo, is_async=True)
        acc_hi = warpgroup_mma(p_smem, hi_smem.index(s), acc_hi, is_async=True)
        acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, acc_hi))
    else:
        for i in range(0, n_tiles):
            s = i % NUM_STAGES
            mbarrier.wait(kv_bar.index(s), (i // NUM_STAGES) & 1)
            lo = lo_smem.index(s)
            hi = hi_smem.index(s)
            kr = kr_smem.index(s)
            qk = warpgroup_mma(q_smem.index(0), lo.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            qk = warpgroup_mma(q_smem.index(1), hi.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma(qr_smem, kr.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, start + i * BLOCK_N, stop, qk_scale, BLOCK_N, col_s)
            # The row max above already synchronised both warpgroups after the previous P V, so
            # p_smem is free; the barrier below makes every warp's P visible before either P V reads it.
            p_smem.store(p)
            fence_async_shared()
            gl.thread_barrier()
            alpha_o = gl.convert_layout(alpha, row_o)
            acc_lo = warpgroup_mma(p_smem, lo, acc_lo * gl.expand_dims(alpha_o, 1), is_async=True)
            acc_hi = warpgroup_mma(p_smem, hi, acc_hi * gl.expand_dims(alpha_o, 1), is_async=True)
            acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, acc_hi))
            gl.thread_barrier()
            _refill(c_desc, kr_desc, kv_bar.index(s), lo, hi, kr, start + (i + NUM_STAGES) * BLOCK_N,
                    i + NUM_STAGES < n_tiles)

    mbarrier.invalidate(q_bar)
    for st in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(kv_bar.index(st))

    # Epilogue in the production layout: o_part [B, P, H, 512] fp32, lse [B, P, H] (natural log).
    # Straight from the wgmma layout: each thread writes 8-byte pairs, whole 32-byte sectors.
    base = (b64 * splits + pid_p) * H
    inv_o = gl.convert_layout(1.0 / l_i, row_o)
    rows_o = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
    cols_o = gl.arange(0, HALF, layout=col_o)
    ptrs = OP + (base + gl.expand_dims(rows_o, 1)) * (2 * HALF) + gl.expand_dims(cols_o, 0)
    gl.store(ptrs, acc_lo * gl.expand_dims(inv_o, 1))
    gl.store(ptrs + HALF, acc_hi * gl.expand_dims(inv_o, 1))
    rows_s = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
    gl.store(LSE + base + rows_s, (m_i + gl.log2(l_i)) * 0.6931471805599453)


def gluon_attention(q_lat, q_rope, latent, k_rope, scale, variant):
    """q_lat [B, H, 1, 512] contiguous, latent [B, 1, T, 512], k_rope [B, 1, T, 64]; S = 1, no mask."""
    B, H, S, r = q_lat.shape
    T = latent.shape[2]
    assert S == 1 and r == R and k_rope.shape[-1] == DR
    assert block_m_for(H) == BLOCK_M and H % BLOCK_M == 0, "64-row tiles only"
    pipeline, block_n, stages = VARIANTS[variant]
    row_tiles = H // BLOCK_M
    splits, chunk = choose_splits(q_lat.device, B, row_tiles, T, BLOCK_M)
    o_part = torch.empty(B, splits, H, r, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(B, splits, H, dtype=torch.float32, device=q_lat.device)
    out = torch.empty(B, H, S, r, dtype=q_lat.dtype, device=q_lat.device)
    _gluon_split_kernel[(row_tiles, splits, B)](
        q_lat, q_rope, latent, k_rope, o_part, lse, float(scale) * LOG2E, H, T, chunk, splits,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, HALF=HALF, DR=DR, PIPELINE=pipeline, NUM_STAGES=stages,
        num_warps=NUM_WARPS)
    merge_splits(o_part, lse, out, S, r, splits)
    return out


def compile_only(shapes):
    """Compile each variant ahead of time for sm_90 (no GPU) and print registers, spills, shared memory."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    H = 128
    target = GPUTarget("cuda", 90, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    names = ["Q", "QR", "C", "KR", "OP", "LSE", "qk_scale", "H", "T", "chunk", "splits"]
    types = ["*bf16"] * 4 + ["*fp32"] * 2 + ["fp32", "i32", "i32", "i32", "i32"]
    for B, T in shapes:
        row_tiles = H // BLOCK_M
        # the splits an H200 (132 SMs) would get; they only matter through the ints' divisibility
        splits = max(1, round(132 / (B * row_tiles)))
        chunk = max(256, triton.cdiv(triton.cdiv(T, splits), 256) * 256)
        splits = triton.cdiv(T, chunk)
        values = [None] * 6 + [0.1, H, T, chunk, splits]
        for name, (pipeline, block_n, stages) in VARIANTS.items():
            sig = dict(zip(names, types))
            consts = dict(BLOCK_M=BLOCK_M, BLOCK_N=block_n, HALF=HALF, DR=DR, PIPELINE=pipeline, NUM_STAGES=stages)
            sig.update({k: "constexpr" for k in consts})
            # what the launcher would specialise: pointers 16-byte aligned, ints divisible by 16
            attrs = {(i, ): [["tt.divisibility", 16]] for i in range(6)}
            attrs.update({(i, ): [["tt.divisibility", 16]] for i in range(7, 11) if values[i] % 16 == 0})
            label = f"B={B} T={T} {name}"
            try:
                src = GluonASTSource(_gluon_split_kernel, sig, consts, attrs)
                k = triton.compile(src, target=target, options={"num_warps": NUM_WARPS})
                with tempfile.TemporaryDirectory() as d:
                    ptx = os.path.join(d, "k.ptx")
                    with open(ptx, "w") as f:
                        f.write(k.asm["ptx"])
                    res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(d, "k.o")],
                                         capture_output=True, text=True)
                info = res.stdout + res.stderr
                regs = re.search(r"Used (\d+) registers", info)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
                print(f"{label}: compiled; regs {regs.group(1) if regs else '?'}, "
                      f"spill stores/loads {spills.group(1) + '/' + spills.group(2) if spills else '?'} B, "
                      f"shared {k.metadata.shared} B, global scratch {k.metadata.global_scratch_size} B, "
                      f"cubin {len(k.asm.get('cubin', b''))} B", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{label}: FAILED {type(e).__name__}: " + "\n".join(str(e).splitlines()[:12]), flush=True)
                if os.environ.get("GLUON_TRACE"):
                    traceback.print_exc()


def flash_mla_runner(q_lat, q_rope, latent, k_rope, scale):
    from bench_kernels import flash_mla_fn

    return flash_mla_fn(q_lat, q_rope, latent, k_rope, scale)


def main():
    from triton.testing import do_bench_cudagraph

    from bench_forms import device_name, save_report

    # device-side tensor descriptors live in a global scratch buffer the launcher asks this for
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    lines = [f"# Gluon absorbed split kernel: {torch.cuda.get_device_name()}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- torch {torch.__version__}, triton {triton.__version__}",
             "- command: `python benchmarks/gluon_absorbed.py`",
             "- H=128, S=1, r=512, dr=64, bf16; us = median of CUDA-graph replays (do_bench_cudagraph); "
             "err = max |variant - production kernel| / max |production|", "",
             "| B | T | variant | us | vs production | vs FlashMLA | err |", "|---|---|---|---|---|---|---|"]
    scale = 192 ** -0.5
    for B, T in ((8, 4096), (8, 4100), (32, 16384), (64, 4096), (1, 16384)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q_lat = torch.randn(B, 128, 1, R, device="cuda", dtype=DT, generator=g)
        q_rope = torch.randn(B, 128, 1, DR, device="cuda", dtype=DT, generator=g)
        latent = torch.randn(B, 1, T, R, device="cuda", dtype=DT, generator=g)
        k_rope = torch.randn(B, 1, T, DR, device="cuda", dtype=DT, generator=g)
        ref = absorbed_latent_attention(q_lat, q_rope, latent, k_rope, scale=scale)
        t_prod = do_bench_cudagraph(lambda: absorbed_latent_attention(q_lat, q_rope, latent, k_rope, scale=scale),
                                    rep=60, return_mode="median") * 1e3
        t_fm = float("nan")
        try:
            fm = flash_mla_runner(q_lat, q_rope, latent, k_rope, scale)
            fm()
            t_fm = do_bench_cudagraph(fm, rep=60, return_mode="median") * 1e3
        except Exception as e:  # noqa: BLE001
            print("FlashMLA:", type(e).__name__, str(e)[:200])
        lines.append(f"| {B} | {T} | production | {t_prod:.1f} | 1.00 | {t_prod / t_fm:.2f} | 0 |")
        lines.append(f"| {B} | {T} | FlashMLA | {t_fm:.1f} | {t_fm / t_prod:.2f} | 1.00 | |")
        print(lines[-2], lines[-1], sep="\n", flush=True)
        for name in VARIANTS:
            try:
                fn = lambda: gluon_attention(q_lat, q_rope, latent, k_rope, scale, name)  # noqa: E731
                got = fn()
                torch.cuda.synchronize()
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                if not err < 1e-2:   # NaN too: a wrong kernel is not worth timing
                    raise AssertionError(f"max relative error {err:.2e} >= 1e-2")
                t = do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3
                lines.append(f"| {B} | {T} | gluon {name} | {t:.1f} | {t / t_prod:.2f} | {t / t_fm:.2f} | {err:.1e} |")
            except Exception as e:  # noqa: BLE001
                first = " / ".join(str(e).splitlines()[:3])[:300] if str(e) else ""
                lines.append(f"| {B} | {T} | gluon {name} | failed: {type(e).__name__}: {first} | | | |")
            print(lines[-1], flush=True)
    save_report("\n".join(lines) + "\n", f"gluon-absorbed-{device_name(torch.device('cuda'))}.md", (),
                os.environ.get("OUT"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true",
                    help="compile each variant for sm_90 ahead of time (no GPU) and print regs/spills/smem")
    args = ap.parse_args()
    if args.compile_only:
        compile_only(((8, 4096), (8, 4100)))
    else:
        main()
