"""The absorbed form's per-head projections: the Triton kernel (kernels/head_projection.py) against
torch.bmm (cuBLAS), alone and inside the whole absorbed op, CUDA-graph replays (GPU only).

    python benchmarks/head_projection_ab.py

Rows: q_nope W_UK (absorb: the kernel called directly; the op keeps cuBLAS for it) and o_lat W_UV^T
(project: the op's path, kernel on and off) at H heads and B*S rows, then the whole op
(absorption, attention core, output projection) at T=4096. floor = the weight bytes read / the measured
copy rate. Appends its table to benchmarks/results/head-projection-ab-<device>.md.
"""
import datetime
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forms import time_graph  # noqa: E402
from bench_kernels import DN, DR, R, copy_rate, fmt, inputs, save_results  # noqa: E402

from mla_compile.kernels import head_projection  # noqa: E402
from mla_compile.kernels.absorbed_decode import absorb, absorbed_decode, project  # noqa: E402

LINES = []


def out(line=""):
    print(line, flush=True)
    LINES.append(line)


def timed(fn, kernel_fn=None):
    """(bmm us, kernel us, max |kernel - bmm| / max |bmm|): fn with the kernel off and on
    (head_projection.ENABLED), or fn against kernel_fn."""
    res = {}
    for on in (False, True):
        head_projection.ENABLED = on
        f = kernel_fn if on and kernel_fn else fn
        res[on] = (f().float(), time_graph(f, 20, torch.device("cuda")) * 1e6)
    head_projection.ENABLED = True
    ref = res[False][0]
    best = getattr(head_projection._per_head_matmul_kernel, "best_config", None)
    print(f"  best config: {best}", flush=True)
    return res[False][1], res[True][1], ((res[True][0] - ref).abs().max() / ref.abs().max()).item()


def main():
    bw = copy_rate()
    out(f"\n## Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {torch.cuda.get_device_name()}\n")
    out(f"- torch {torch.__version__}, triton {triton.__version__}; command: `python benchmarks/head_projection_ab.py`")
    out(f"- bf16; CUDA-graph replays, each call after an L2 flush (bench_forms.time_graph: a decode step finds "
        f"no weight in L2), us; floor = weight bytes / copy rate ({bw / 1e12:.2f} TB/s); "
        "diff = max |kernel - bmm| / max |bmm|\n")
    out("| what | H | rows (B*S) | T | bmm us | kernel us | kernel/bmm | floor us | diff |")
    out("|---|---|---|---|---|---|---|---|---|")
    scale = 1 / math.sqrt(DN + DR)
    for H in (128, 32, 16):
        for B in (1, 8, 32, 64):
            x = inputs(B, H, 1, 4096)
            w_bytes = H * DN * R * 2      # W_UK's; W_UV's the same (dv = dn)
            q_lat = absorb(x["q_nope"], x["w_uk"], torch.bfloat16)
            o_lat = q_lat.permute(1, 0, 2, 3).reshape(H, B, R).contiguous()
            q = x["q_nope"].permute(1, 0, 2, 3).reshape(H, B, DN)
            y = torch.empty(H, B, R, dtype=torch.bfloat16, device="cuda")
            for what, fn, kfn in (("absorb", lambda: absorb(x["q_nope"], x["w_uk"], torch.bfloat16),
                                   lambda: head_projection.per_head_matmul(q, x["w_uk"], y).view(H, B, 1, R)
                                   .permute(1, 0, 2, 3)),  # the op keeps cuBLAS here
                                  ("project", lambda: project(o_lat, x["w_uv"], B, 1, torch.bfloat16), None)):
                a, k, d = timed(fn, kfn)
                out(f"| {what} | {H} | {B} | | {fmt(a)} | {fmt(k)} | {k / a:.2f} | {fmt(w_bytes / bw * 1e6)} | "
                    f"{d:.1e} |")
            a, k, d = timed(lambda: absorbed_decode(x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"],
                                                    x["w_uv"], None, scale, False))
            out(f"| whole op | {H} | {B} | 4096 | {fmt(a)} | {fmt(k)} | {k / a:.2f} | | {d:.1e} |")
            del x, q_lat, o_lat, q, y
            torch.cuda.empty_cache()
    save_results("head-projection-ab", LINES, append=True)


if __name__ == "__main__":
    main()
