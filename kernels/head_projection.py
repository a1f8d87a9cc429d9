"""The absorbed form's output projection at decode sizes, as a Triton kernel of per-head products.

Math (per head h; rows m = (batch b, query s) folded, M = B * S):

    out[h, m, :] = o_lat[h, m, :] W_UV[h]^T          [M, r] x [r, dv] -> [M, dv]

(or any y[h] = x[h] w[h]). It reads a 128 KB weight slice per head (16.8 MB over V3's 128 heads) for
a handful of rows: the time is the weight read. `_per_head_matmul_kernel`, grid (N / BLOCK_N, H,
M / BLOCK_M): each program streams one [K, BLOCK_N] slice of its head's weight through fp32 `tl.dot`s
against the rows, so the weight is read once, by hundreds of programs, with the K loop pipelined. At
128 heads and B=8 it takes 8.9 us against cuBLAS's batched GEMM's 11.6 with L2 flushed (a decode step
finds no weight in L2), 0.60-0.96x at 16-128 heads and 1-64 rows (on an H200; docs/design.md).
Strides are free on every operand: W_UV^T is a transposed view of kv_b_proj's weight (no copy),
and at one query a step the output [B, H, 1, dv] is written in place. (The absorption q_nope W_UK,
whose K is 128, stays on cuBLAS: faster there with L2 warm, within 0.84-1.17x cold.)

Taken where M <= MAX_ROWS (decode, short appends); larger M (prefill-sized absorbed calls) stays on
torch.bmm (the kernel was not measured there).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mla_compile.kernels.common import launcher

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_ROWS = 64

if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
else:
    # the configs that win the autotuning on an H200: few rows take narrow N tiles (more programs in
    # flight), more rows wider ones
    _CONFIGS = [
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=2, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=2, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_CONFIGS, key=["ROWS_BUCKET", "H", "K", "N"])
@triton.jit
def _per_head_matmul_kernel(
    X, W, Y, H, M, K, N,
    s_xh, s_xm, s_xk, s_wh, s_wk, s_wn, s_yh, s_ym, s_yn,
    ROWS_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    x_rows = X + h * s_xh + offs_m[:, None].to(tl.int64) * s_xm
    w_cols = W + h * s_wh + offs_n[None, :].to(tl.int64) * s_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * s_xk, mask=m_ok & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None] * s_wk, mask=k_ok[:, None] & n_ok, other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PREC)
    y = Y + h * s_yh + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn
    tl.store(y, acc.to(Y.dtype.element_ty), mask=m_ok & n_ok)


def takes(x: torch.Tensor, rows: int) -> bool:
    """Whether the kernel takes a per-head product of `rows` rows on x's device."""
    return rows <= MAX_ROWS and (x.is_cuda or INTERPRET)     # is_cuda: no torch.device object built


def per_head_matmul(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y[h] = x[h] @ w[h] for x [H, M, K], w [H, K, N], y [H, M, N] (any strides; y written in place,
    in its own dtype), fp32 accumulation, x's dtype into the dot (w is cast to it tile by tile)."""
    H, M, K = x.shape
    N = w.shape[2]
    if w.shape[:2] != (H, K) or tuple(y.shape) != (H, M, N):
        raise ValueError(f"per_head_matmul: x {tuple(x.shape)}, w {tuple(w.shape)}, y {tuple(y.shape)} do not chain")
    if H * M * N == 0:
        return y
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), H, triton.cdiv(M, block_m))  # noqa: E731
    launcher(_per_head_matmul_kernel, x)[grid](
        x, w, y, H, M, K, N, *x.stride(), *w.stride(), *y.stride(), block_m,
        BLOCK_M=block_m, DOT_PREC=prec,
    )
    return y
