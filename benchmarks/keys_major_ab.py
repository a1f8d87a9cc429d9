"""The keys-major Gluon kernel (<= 32 heads) against the Triton kernel and the heads-major Gluon kernel
forced to the same head counts, against the bytes floor: same inputs, CUDA-graph replays (GPU only).

    python benchmarks/keys_major_ab.py [--quick] [--prefetch 1,2,4]

--prefetch: the keys-major kernel with PREFETCH key tiles prefetched into L2 ahead of its ring, each
count a column, instead of the heads-major column.

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
from bench_kernels import DN, DR, R, bench, copy_rate, fmt, inputs  # noqa: E402

from mla_compile.kernels import absorbed_decode_hopper as hopper  # noqa: E402
from mla_compile.kernels import absorbed_decode_keys_major as keys_major  # noqa: E402
from mla_compile.kernels.absorbed_decode import absorbed_latent_attention  # noqa: E402

QUICK = "--quick" in sys.argv
PREFETCH = [int(v) for v in sys.argv[sys.argv.index("--prefetch") + 1].split(",")] if "--prefetch" in sys.argv else []
# name -> (environment, keys-major PREFETCH)
VARIANTS = {"triton": ({"MLA_COMPILE_GLUON": "0"}, 0), "keys-major": ({}, 0)}
if PREFETCH:
    VARIANTS.update({f"prefetch {n}": ({}, n) for n in PREFETCH})
else:
    VARIANTS["heads-major"] = ({"MLA_COMPILE_KEYS_MAJOR": "0"}, 0)
LINES = []


def out(line=""):
    print(line, flush=True)
    LINES.append(line)


def run(fn, env, prefetch):
    for k in ("MLA_COMPILE_GLUON", "MLA_COMPILE_KEYS_MAJOR"):
        os.environ.pop(k, None)
    os.environ.update(env)
    keys_major.PREFETCH = prefetch
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
    others = [n for n in VARIANTS if n not in ("triton", "keys-major")]
    out("| H | B | T | Triton us | keys-major us | " + "".join(f"{n} us | " for n in others) + "keys/Triton | floor us | "
        "floor/Triton | floor/keys-major | " + "".join(f"floor/{n} | " for n in others) + "rel diff keys | "
        + " | ".join(f"rel diff {n}" for n in others) + " |")
    out("|---" * (10 + 3 * len(others)) + "|")
    Hs = (32, 16, 20, 8) if not (QUICK or PREFETCH) else (32, 16)
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
            res = {name: run(fn, *v) for name, v in VARIANTS.items()}
            ref = res["triton"][0]
            diff = {n: ((res[n][0] - ref).abs().max() / ref.abs().max()).item() for n in res}
            t = {n: res[n][1] for n in res}
            by = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R)
            floor = by / bw * 1e6
            out(f"| {H} | {B} | {T} | {fmt(t['triton'])} | {fmt(t['keys-major'])} | "
                + "".join(f"{fmt(t[n])} | " for n in others)
                + f"{t['keys-major'] / t['triton']:.2f} | {fmt(floor)} | {100 * floor / t['triton']:.0f}% | "
                f"{100 * floor / t['keys-major']:.0f}% | " + "".join(f"{100 * floor / t[n]:.0f}% | " for n in others)
                + f"{diff['keys-major']:.1e} | " + " | ".join(f"{diff[n]:.1e}" for n in others) + " |")
            del x, q
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name().replace(" ", "-")
    tag = "-prefetch" if PREFETCH else ""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"keys-major-ab{tag}-{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(LINES) + "\n")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(path)), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
