"""Experiment (issue 4): can the absorbed decode kernel close the gap to FlashMLA on Hopper?

    python benchmarks/absorbed_experiments.py

Not part of the backend. One candidate kernel beside the production one
(`kernels/absorbed_decode._absorbed_split_kernel`), same math, same split/merge scheme:

- the latent tile arrives through TMA (device-side tensor descriptors, `tl.make_tensor_descriptor`),
  in two 256-wide halves (a TMA box is at most 256 elements a side), so the accumulator is two
  [BLOCK_M, 256] halves and q two halves; the descriptor's row count is the valid length, so TMA
  zero-fills past it (no garbage of an unwritten cache reaches the PV product);
- optionally `tl.range(..., warp_specialize=True)`: Triton 3.5+'s automatic warp specialisation
  for Hopper (a producer warp group issuing the TMA loads, consumers doing the MMAs), which is
  what FlashMLA does by hand.

Each variant is checked against the production kernel's output, then timed (CUDA-graph replay, the
same way bench_kernels.py times the 'gr' columns) beside FlashMLA where it is installed. Prints one
table; writes it to benchmarks/results/absorbed-experiments-<device>.md (and to $OUT if set).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_forms import device_name, save_report  # noqa: E402
from mla_compile.kernels.absorbed_decode import (  # noqa: E402
    absorbed_latent_attention, block_m_for, choose_splits, merge_splits)

R, DR = 512, 64
DT = torch.bfloat16


@triton.jit
def _tma_split_kernel(
    Q, QR, C, KR, OP, ML, sm_scale, M, T, chunk,
    s_qb, s_qm, s_rb, s_rm, s_cb, s_ct, s_kb, s_kt, s_pb, s_pp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, DR: tl.constexpr, WS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, DR)
    q_lo = tl.load(Q + b * s_qb + rows[:, None] * s_qm + offs_h[None, :], mask=row_ok[:, None], other=0.0)
    q_hi = tl.load(Q + b * s_qb + rows[:, None] * s_qm + HALF + offs_h[None, :], mask=row_ok[:, None], other=0.0)
    qr = tl.load(QR + b * s_rb + rows[:, None] * s_rm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    c_desc = tl.make_tensor_descriptor(C + b * s_cb, shape=[T, 2 * HALF], strides=[s_ct, 1],
                                       block_shape=[BLOCK_N, HALF])
    k_desc = tl.make_tensor_descriptor(KR + b * s_kb, shape=[T, DR], strides=[s_kt, 1], block_shape=[BLOCK_N, DR])
    start = (pid_p * chunk).to(tl.int32)
    stop = tl.minimum(start + chunk, T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF], tl.float32)
    for n0 in tl.range(start, stop, BLOCK_N, warp_specialize=WS):
        c_lo = c_desc.load([n0, 0])
        c_hi = c_desc.load([n0, HALF])
        kr = k_desc.load([n0, 0])
        qk = tl.dot(q_lo, tl.trans(c_lo))
        qk = tl.dot(q_hi, tl.trans(c_hi), qk)
        qk = tl.dot(qr, tl.trans(kr), qk)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        qk = tl.where((offs_n < stop)[None, :], qk * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2((m_i - m_new) * 1.4426950408889634)
        p = tl.exp2((qk - m_new[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        pb = p.to(c_lo.dtype)
        acc_lo = tl.dot(pb, c_lo, acc_lo * alpha[:, None])
        acc_hi = tl.dot(pb, c_hi, acc_hi * alpha[:, None])
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    base = b * s_pb + pid_p * s_pp
    tl.store(OP + base + rows[:, None] * (2 * HALF) + offs_h[None, :], acc_lo / l_safe[:, None], mask=row_ok[:, None])
    tl.store(OP + base + rows[:, None] * (2 * HALF) + HALF + offs_h[None, :], acc_hi / l_safe[:, None],
             mask=row_ok[:, None])
    ml = ML + 2 * (base // (2 * HALF) + rows)   # (m, l) per row, merge_splits' layout
    tl.store(ml, m_i, mask=row_ok)
    tl.store(ml + 1, l_i, mask=row_ok)


def tma_attention(q_lat, q_rope, latent, k_rope, scale, block_n, warps, stages, ws):
    """q_lat [B, H, 1, 512] contiguous, latent [B, 1, T, 512], k_rope [B, 1, T, 64]; S = 1, no mask."""
    B, H, S, r = q_lat.shape
    T = latent.shape[2]
    M = H * S
    BLOCK_M = block_m_for(M)
    row_tiles = triton.cdiv(M, BLOCK_M)
    splits, chunk = choose_splits(q_lat.device, B, row_tiles, T, BLOCK_M)
    o_part = torch.empty(B, splits, M, r, dtype=torch.float32, device=q_lat.device)
    ml = torch.empty(B, splits, M, 2, dtype=torch.float32, device=q_lat.device)
    out = torch.empty(B, H, S, r, dtype=q_lat.dtype, device=q_lat.device)
    _tma_split_kernel[(row_tiles, splits, B)](
        q_lat, q_rope, latent, k_rope, o_part, ml, float(scale), M, T, chunk,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent.stride(0), latent.stride(2), k_rope.stride(0), k_rope.stride(2),
        o_part.stride(0), o_part.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, HALF=r // 2, DR=DR, WS=ws, num_warps=warps, num_stages=stages)
    merge_splits(o_part, ml, out, S, r, splits)
    return out


def flash_mla_runner(q_lat, q_rope, latent, k_rope, scale):
    from bench_kernels import flash_mla_fn

    return flash_mla_fn(q_lat, q_rope, latent, k_rope, scale)


def main():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    lines = [f"# Absorbed decode experiments: {torch.cuda.get_device_name()}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- torch {torch.__version__}, triton {triton.__version__}",
             "- command: `python benchmarks/absorbed_experiments.py`",
             "- H=128, S=1, r=512, dr=64, bf16; us = median of CUDA-graph replays (do_bench_cudagraph); "
             "err = max |variant - production kernel| / max |production|", "",
             "| B | T | variant | us | vs production | vs FlashMLA | err |", "|---|---|---|---|---|---|---|"]
    scale = 192 ** -0.5
    for B, T in ((8, 4096), (32, 16384), (64, 4096)):
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
        for ws in (False, True):
            for block_n, warps, stages in ((64, 8, 2), (32, 8, 3), (64, 8, 3), (32, 8, 4), (64, 4, 2)):
                name = f"tma halves{' + ws' if ws else ''} BN={block_n} w={warps} st={stages}"
                try:
                    fn = lambda: tma_attention(q_lat, q_rope, latent, k_rope, scale, block_n, warps, stages, ws)  # noqa: E731
                    got = fn()
                    torch.cuda.synchronize()
                    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    t = do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3
                    lines.append(f"| {B} | {T} | {name} | {t:.1f} | {t / t_prod:.2f} | {t / t_fm:.2f} | {err:.1e} |")
                except Exception as e:  # noqa: BLE001
                    lines.append(f"| {B} | {T} | {name} | failed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:100] if str(e) else ''} | | | |")
                print(lines[-1], flush=True)
    save_report("\n".join(lines) + "\n", f"absorbed-experiments-{device_name(torch.device('cuda'))}.md", (),
                os.environ.get("OUT"))


if __name__ == "__main__":
    main()
