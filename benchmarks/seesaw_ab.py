"""The heads-major Hopper kernel in lockstep (absorbed_decode_hopper) against the same kernel with
FlashMLA's alternate-tile schedule (absorbed_decode_seesaw, MLA_COMPILE_SEESAW=1) and FlashMLA, same
inputs, CUDA-graph replays (GPU only). Times: kernel and split merge, us.

    python benchmarks/seesaw_ab.py

Appends its table to benchmarks/results/seesaw-ab-<device>.md (earlier runs stay above it).
"""
import datetime
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, bench, flash_mla_fn, fmt, inputs, save_results  # noqa: E402

from mla_compile.kernels.absorbed_decode import absorbed_latent_attention  # noqa: E402

LINES = []


def out(line=""):
    print(line, flush=True)
    LINES.append(line)


def run(fn, seesaw: bool):
    os.environ["MLA_COMPILE_SEESAW"] = "1" if seesaw else "0"
    return fn().float(), bench(fn, graph=True)


def main():
    out(f"# Lockstep vs alternate-tile (seesaw) heads-major kernel: {torch.cuda.get_device_name()}\n")
    out(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"triton {triton.__version__}; command: `python benchmarks/seesaw_ab.py`")
    out("- bf16, S=1, r=512, dr=64, no mask; CUDA-graph replay medians (us), kernel and split merge; rel diff: "
        "max |a - b| / max |b| against the lockstep kernel")
    out("- seesaw: kernels/absorbed_decode_seesaw.py as committed with this table (FlashMLA's schedule: 64-column "
        "pieces on their own mbarriers, each warpgroup's own P from registers, no producer warp); "
        f"MLA_COMPILE_SEESAW_PIECES={os.environ.get('MLA_COMPILE_SEESAW_PIECES', '9')} (3: one mbarrier per "
        "latent half and one for RoPE)\n")
    out("| H | B | T | lockstep us | seesaw us | FlashMLA us | seesaw/lockstep | lockstep/FlashMLA | "
        "seesaw/FlashMLA | rel diff |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    scale = 1 / math.sqrt(DN + DR)
    for H, B, T in ((128, 8, 4096), (128, 8, 16384), (128, 32, 4096), (128, 64, 4096), (128, 32, 16384),
                    (128, 8, 65536), (128, 1, 4096), (64, 8, 16384), (128, 64, 16384)):
        x = inputs(B, H, 1, T)
        q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
        fn = lambda: absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"], None, scale, False)  # noqa
        (o0, t0), (o1, t1) = run(fn, False), run(fn, True)
        try:
            tf = bench(flash_mla_fn(q, x["q_rope"], x["latent"], x["k_rope"], scale), graph=True)
        except Exception as e:  # noqa: BLE001
            print(f"  FlashMLA: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            tf = None
        d1 = ((o1 - o0).abs().max() / o0.abs().max()).item()
        r = lambda a, b: "n/a" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
        out(f"| {H} | {B} | {T} | {fmt(t0)} | {fmt(t1)} | {fmt(tf)} | {r(t1, t0)} | {r(t0, tf)} | {r(t1, tf)} | "
            f"{d1:.1e} |")
        del x, q
        torch.cuda.empty_cache()
    save_results("seesaw-ab", LINES, append=True)

if __name__ == "__main__":
    main()
