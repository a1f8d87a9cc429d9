"""The split merge launched as a programmatic dependent (PDL) of the Gluon split kernel, against launched
after it: same inputs, CUDA-graph replays of the absorbed core (split kernel + merge), GPU only.

    python benchmarks/pdl_merge_ab.py

With PDL (the default, MLA_COMPILE_PDL_MERGE=1) each split program lets its dependents launch at its
start, and the merge, launched with launch_pdl, waits in griddepcontrol.wait for the split grid's end:
its programs are on the SMs when the split kernel ends. Without it the merge is launched after the split
kernel's last program, as before. The two are timed alternately, twice each (the better of two
medians), at the bench_kernels.py points, H = 128 (the seesaw kernel) and 32, 16 (keys-major).
Appends its table to benchmarks/results/pdl-merge-ab-<device>.md.
"""
import datetime
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, R, bench, copy_rate, fmt, inputs, save_results  # noqa: E402

from mla_compile.kernels import absorbed_decode  # noqa: E402

POINTS = [(8, 4096), (8, 16384), (8, 65536), (32, 4096), (32, 16384), (32, 65536), (64, 4096), (64, 16384)]
LINES = []


def out(line=""):
    print(line, flush=True)
    LINES.append(line)


def main():
    bw = copy_rate()
    out(f"\n## Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: "
        f"{torch.cuda.get_device_name()}\n")
    out(f"- torch {torch.__version__}, triton {triton.__version__}; command: `python benchmarks/pdl_merge_ab.py`")
    out(f"- bf16, S=1, r=512, dr=64, no mask; floor = bytes / measured copy rate ({bw / 1e12:.2f} TB/s); times: "
        "CUDA-graph replay medians (us) of split kernel + merge, the better of two alternating runs each; "
        "same = the two outputs bitwise equal\n")
    out("| H | B | T | after us | PDL us | PDL/after | floor us | floor/after | floor/PDL | same |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    scale = 1 / math.sqrt(DN + DR)
    for H in (128, 32, 16):
        for B, T in POINTS:
            x = inputs(B, H, 1, T)
            q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
            fn = lambda: absorbed_decode.absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"],  # noqa
                                                                   None, scale, False)
            t, o = {False: [], True: []}, {}
            for pdl in (False, True, False, True):
                absorbed_decode.PDL_MERGE = pdl
                o[pdl] = fn().clone()
                t[pdl].append(bench(fn, graph=True))
            absorbed_decode.PDL_MERGE = True
            a, p = min(t[False]), min(t[True])
            same = torch.equal(o[False], o[True])
            floor = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R) / bw * 1e6
            out(f"| {H} | {B} | {T} | {fmt(a)} | {fmt(p)} | {p / a:.3f} | {fmt(floor)} | {100 * floor / a:.0f}% | "
                f"{100 * floor / p:.0f}% | {same} |")
            del x, q, o
            torch.cuda.empty_cache()
    save_results("pdl-merge-ab", LINES, append=True)


if __name__ == "__main__":
    main()
