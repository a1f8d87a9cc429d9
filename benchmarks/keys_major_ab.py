"""The keys-major Gluon kernel (<= 32 heads) against the Triton kernel and the heads-major Gluon kernel
forced to the same head counts, against the bytes floor: same inputs, CUDA-graph replays (GPU only).

    python benchmarks/keys_major_ab.py [--quick]

Each variant is selected the way a user would: MLA_COMPILE_GLUON=0 (Triton), MLA_COMPILE_KEYS_MAJOR=0
with the heads-major kernel's MIN_HEADS lowered to 1 (heads-major), neither (keys-major, the default).
Times: kernel + split merge, us. Writes benchmarks/results/keys-major-ab-<device>.md.
"""
import datetime
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, R, bench, copy_rate, fmt, inputs, save_results  # noqa: E402

from mla_compile.kernels import absorbed_decode_hopper as hopper  # noqa: E402
from mla_compile.kernels.absorbed_decode import absorbed_latent_attention  # noqa: E402

QUICK = "--quick" in sys.argv
VARIANTS = {"triton": {"MLA_COMPILE_GLUON": "0"}, "heads-major": {"MLA_COMPILE_KEYS_MAJOR": "0"},
            "keys-major": {}}
LINES = []


def out(line=""):
    print(line, flush=True)
    LINES.append(line)


def run(fn, env):
    for k in ("MLA_COMPILE_GLUON", "MLA_COMPILE_KEYS_MAJOR"):
        os.environ.pop(k, None)
    os.environ.update(env)
    return fn().float(), bench(fn, graph=True)


def main():
    bw = copy_rate()
    hopper.MIN_HEADS = 1    # the heads-major kernel takes any head count when keys-major is off
    out(f"# Keys-major Gluon kernel at few heads: {torch.cuda.get_device_name()}\n")
    out(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"triton {triton.__version__}; command: `python benchmarks/keys_major_ab.py {' '.join(sys.argv[1:])}`")
    out(f"- bf16, S=1, r=512, dr=64, no mask; floor = bytes read / measured copy rate ({bw / 1e12:.2f} TB/s, "
        "read + written); times: CUDA-graph replay medians (us), kernel and split merge; rel diff: max |a - b| "
        "/ max |b| against the Triton kernel\n")
    out("| H | B | T | Triton us | heads-major us | keys-major us | keys/Triton | floor us | floor/Triton | "
        "floor/keys-major | rel diff keys | rel diff heads |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|")
    Hs = (32, 16, 20, 8) if not QUICK else (32, 16)
    points = [(B, T) for B in (1, 8, 32, 64) for T in (1024, 4096, 16384, 65536) if B * T <= (1 << 21)]
    if QUICK:
        points = [(8, 4096), (32, 16384)]
    scale = 1 / math.sqrt(DN + DR)
    for H in Hs:
        for B, T in points:
            x = inputs(B, H, 1, T)
            q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
            fn = lambda: absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"], None, scale,  # noqa
                                                   False)
            res = {name: run(fn, env) for name, env in VARIANTS.items()}
            ref = res["triton"][0]
            diff = {n: ((res[n][0] - ref).abs().max() / ref.abs().max()).item() for n in res}
            t = {n: res[n][1] for n in res}
            by = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R)
            floor = by / bw * 1e6
            out(f"| {H} | {B} | {T} | {fmt(t['triton'])} | {fmt(t['heads-major'])} | {fmt(t['keys-major'])} | "
                f"{t['keys-major'] / t['triton']:.2f} | {fmt(floor)} | {100 * floor / t['triton']:.0f}% | "
                f"{100 * floor / t['keys-major']:.0f}% | {diff['keys-major']:.1e} | {diff['heads-major']:.1e} |")
            del x, q
            torch.cuda.empty_cache()
    save_results("keys-major-ab", LINES)

if __name__ == "__main__":
    main()
