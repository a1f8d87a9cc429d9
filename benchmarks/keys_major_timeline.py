"""Where the keys-major split kernel's time goes at few heads: a timeline of its programs from
%globaltimer stamps (GPU only).

    python benchmarks/keys_major_timeline.py

At 16-32 heads the kernel streams the latent at 94-105% of the bytes floor from 64 key tiles a program
but reaches 72-77% at 16 tiles (keys-major-ring-ab-NVIDIA-H200.md). This launches it once more with
STAMPS=True (each program writes %globaltimer at its start, after its prologue, when Q and when its
first key tile landed, after its key loop and after its stores; and its SM) at the splits
`absorbed_latent_attention` picks, and prints, per point, the kernel's and the merge's CUDA-graph
times and the spread of each phase over the programs. Appends to
benchmarks/results/keys-major-timeline-<device>.md.
"""
import datetime
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, R, bench, copy_rate, fmt, inputs, save_results  # noqa: E402

from mla_compile.kernels import absorbed_decode_keys_major as km  # noqa: E402
from mla_compile.kernels.absorbed_decode import choose_splits, merge_splits  # noqa: E402

LINES = []
POINTS = [(32, 8, 4096), (32, 8, 16384), (32, 32, 4096), (32, 8, 65536), (16, 8, 16384), (16, 32, 4096)]


def out(line=""):
    print(line, flush=True)
    LINES.append(line)


def spread(x):
    """min / median / max of a 1-D tensor of ns, in us"""
    x = x.double() / 1e3
    return f"{x.min():.1f} / {x.median():.1f} / {x.max():.1f}"


def main():
    bw = copy_rate()
    out(f"# Keys-major split kernel: timeline of its programs: {torch.cuda.get_device_name()}\n")
    out(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"triton {triton.__version__}; command: `python benchmarks/keys_major_timeline.py`")
    out("- bf16, S=1, r=512, dr=64, no mask, no valid lengths; kernel / merge: CUDA-graph replay medians of each "
        "alone (us); the phases: min / median / max over the programs of one stamped launch (us, %globaltimer); "
        "start = the program's start after the earliest program's; rate = the key loop's bytes / its time, "
        f"summed over the programs running at once (floor rate: the measured copy rate, {bw / 1e12:.2f} TB/s)\n")
    out("| H | B | T | programs (SMs) | tiles a program | kernel us | merge us | floor us | span us | start | "
        "prologue | Q landed | 1st tile landed | key loop | stores | end | loop rate TB/s |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    scale = 1 / math.sqrt(DN + DR)
    dev = torch.device("cuda")
    for H, B, T in POINTS:
        x = inputs(B, H, 1, T)
        q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
        c, kr, qr = x["latent"][:, 0], x["k_rope"][:, 0], x["q_rope"]
        splits, chunk = choose_splits(dev, B, 1, T, 64)
        o = torch.empty(B, H, 1, R, dtype=q.dtype, device=dev)
        o_part = torch.empty(B, splits, H, R, dtype=torch.float32, device=dev)
        ml = torch.empty(B * splits * (H * 2 + 16), dtype=torch.float32, device=dev)
        ml4 = ml[:B * splits * H * 2].view(B, splits, H, 2)

        def kernel(stamps=False):
            km.keys_major_split_attention(q, qr, c, kr, 0, None, (0, 0, 0), None, o, o_part, ml, scale, chunk,
                                          splits, stamps=stamps)

        t_kernel = bench(kernel, graph=True)
        t_merge = bench(lambda: merge_splits(o_part, ml4, o, 1, R, splits), graph=True)
        kernel(True)
        torch.cuda.synchronize()
        kernel(True)
        torch.cuda.synchronize()
        st = ml[B * splits * H * 2:].view(torch.int64).view(B * splits, 8).cpu()
        t0 = st[:, 0].min()
        start, pro, ql, first, loop, stores = (st[:, 0] - t0, st[:, 1] - st[:, 0], st[:, 2] - st[:, 1],
                                               st[:, 3] - st[:, 0], st[:, 4] - st[:, 3], st[:, 5] - st[:, 4])
        end = st[:, 5] - t0
        tiles = triton.cdiv(chunk, km.BLOCK_N)
        rate = (B * T * (R + DR) * 2) / (loop.double().median() / 1e9) / 1e12   # all programs at the median rate
        floor = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R) / bw * 1e6
        out(f"| {H} | {B} | {T} | {B * splits} ({st[:, 7].unique().numel()}) | {tiles} | {fmt(t_kernel)} | "
            f"{fmt(t_merge)} | {fmt(floor)} | {(st[:, 5].max() - t0) / 1e3:.1f} | {spread(start)} | {spread(pro)} | "
            f"{spread(ql)} | {spread(first)} | {spread(loop)} | {spread(stores)} | {spread(end)} | {rate:.2f} |")
        del x, q, c, kr, qr, o, o_part, ml
        torch.cuda.empty_cache()
    save_results("keys-major-timeline", LINES, append=True)

if __name__ == "__main__":
    main()
