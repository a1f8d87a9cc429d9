"""The keys-major kernel (<= 32 heads) with its key ring in whole 64-key tiles (two stages, each freed
after both o^T MMAs) against the ring in latent halves (five 32 KB halves, each freed as soon as its
own o^T MMA is done), same inputs, CUDA-graph replays (GPU only), at the kernel targets' points
(B in 8, 32, 64; T in 4K, 16K, 64K) and a few small ones. Times: kernel and split merge, us.

    python benchmarks/keys_major_ring_ab.py

Appends its table to benchmarks/results/keys-major-ring-ab-<device>.md (earlier runs stay above it).
"""
import datetime
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, R, bench, copy_rate, fmt, inputs  # noqa: E402

from mla_compile.kernels.absorbed_decode import absorbed_latent_attention  # noqa: E402

LINES = []
POINTS = [(8, 4096), (8, 16384), (8, 65536), (32, 4096), (32, 16384), (32, 65536), (64, 4096), (64, 16384),
          (1, 4096), (8, 1024)]


def out(line=""):
    print(line, flush=True)
    LINES.append(line)


def run(fn, ring: str):
    os.environ["MLA_COMPILE_KEYS_MAJOR_RING"] = ring
    return fn().float(), bench(fn, graph=True)


def main():
    bw = copy_rate()
    out(f"# Keys-major kernel: key ring in tiles vs in latent halves: {torch.cuda.get_device_name()}\n")
    out(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"triton {triton.__version__}; command: `python benchmarks/keys_major_ring_ab.py`")
    out(f"- bf16, S=1, r=512, dr=64, no mask; CUDA-graph replay medians (us), kernel and split merge; floor = "
        f"bytes / measured copy rate ({bw / 1e12:.2f} TB/s); rel diff: max |a - b| / max |b| halves vs tiles\n")
    out("| H | B | T | tiles us | halves us | halves/tiles | floor us | floor/tiles | floor/halves | rel diff |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    scale = 1 / math.sqrt(DN + DR)
    for H in (32, 16):
        for B, T in POINTS:
            x = inputs(B, H, 1, T)
            q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
            fn = lambda: absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"], None, scale, False)  # noqa
            (o0, t0), (o1, t1) = run(fn, "tiles"), run(fn, "halves")
            by = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R)
            floor = by / bw * 1e6
            d1 = ((o1 - o0).abs().max() / o0.abs().max()).item()
            out(f"| {H} | {B} | {T} | {fmt(t0)} | {fmt(t1)} | {t1 / t0:.2f} | {fmt(floor)} | "
                f"{100 * floor / t0:.0f}% | {100 * floor / t1:.0f}% | {d1:.1e} |")
            del x, q
            torch.cuda.empty_cache()
    os.environ.pop("MLA_COMPILE_KEYS_MAJOR_RING")
    name = torch.cuda.get_device_name().replace(" ", "-")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"keys-major-ring-ab-{name}.md")
    with open(path, "a") as f:
        f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
