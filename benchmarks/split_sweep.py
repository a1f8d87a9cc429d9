"""How many splits should the absorbed decode kernel use at small head counts? (GPU only.)

At H = 16 or 32 the kernel is bound by reading the latent cache, and its time is set by how many
bytes each SM has in flight: the number of programs (row tiles x splits x batch) and how long each
one streams. This sweeps the split count around `choose_splits`' choice at each point and prints,
beside the bytes floor (bytes / measured copy rate), the time of the choice and of the best count
(CUDA-graph replays: GPU time), so the choice can be corrected from measurement.

    python benchmarks/split_sweep.py [--heads 16,32] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")

from bench_kernels import R, DR, DN, bench, copy_rate, fmt, inputs  # noqa: E402

from mla_compile.kernels import absorbed_decode_keys_major as keys_major  # noqa: E402
from mla_compile.kernels.absorbed_decode import (  # noqa: E402
    absorbed_latent_attention, block_m_for, choose_splits,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="16,32")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    bw = copy_rate()
    dev = torch.cuda.get_device_name()
    out(f"# Absorbed decode: split count against time, {dev}")
    out()
    out(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}")
    out(f"- command: `python benchmarks/split_sweep.py {' '.join(sys.argv[1:])}`")
    out(f"- bf16, S=1, r={R}, dr={DR}; floor = bytes read / copy rate ({bw / 1e12:.2f} TB/s, read + written); "
        "times: CUDA-graph replay medians (us), kernel and split merge")
    out()
    out("| H | B | T | floor | chosen splits | chosen us | floor/chosen | best splits | best us | floor/best | all (splits: us) |")
    out("|---|---|---|---|---|---|---|---|---|---|---|")
    scale = 1 / math.sqrt(DN + DR)
    points = [(8, 4096), (32, 4096), (8, 16384), (1, 65536), (32, 16384), (64, 4096)]
    if a.quick:
        points = points[:2]
    for H in map(int, a.heads.split(",")):
        for B, T in points:
            x = inputs(B, H, 1, T)
            q_lat = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
            # the dispatch's row tile: a keys-major program takes all heads of a batch (as 64 rows)
            bm = 64 if keys_major.applies(q_lat.device, q_lat.dtype, H, 1, R, DR, False) else block_m_for(H)
            chosen, _ = choose_splits(q_lat.device, B, math.ceil(H / bm), T, bm)
            counts = sorted({max(1, chosen // 2), chosen, chosen * 2, chosen * 4, chosen * 8, chosen * 16} - {0})
            times = {}
            for p in counts:
                if T // p < 32:
                    continue
                times[p] = bench(lambda: absorbed_latent_attention(q_lat, x["q_rope"], x["latent"], x["k_rope"],  # noqa
                                                                   None, scale, False, num_splits=p), graph=True)
            by = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R)
            floor = by / bw * 1e6
            ok = {p: t for p, t in times.items() if t is not None}
            best = min(ok, key=ok.get)
            # the kernel rounds a requested count to whole chunks of 64 keys; report the request
            t0 = bench(lambda: absorbed_latent_attention(q_lat, x["q_rope"], x["latent"], x["k_rope"], None,  # noqa
                                                         scale, False), graph=True)
            out(f"| {H} | {B} | {T} | {fmt(floor)} | {chosen} | {fmt(t0)} | {100 * floor / t0:.0f}% | {best} | "
                f"{fmt(ok[best])} | {100 * floor / ok[best]:.0f}% | "
                + ", ".join(f"{p}: {fmt(t)}" for p, t in ok.items()) + " |")
            del x, q_lat
            torch.cuda.empty_cache()
    path = os.path.join(os.environ.get("OUT", RESULTS), f"split-sweep-{dev.replace(' ', '-')}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
