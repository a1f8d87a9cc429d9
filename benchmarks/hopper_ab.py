"""The absorbed core with the Hopper (Gluon) kernel against the Triton kernel, same inputs, with and
without HF's decode mask (GPU only; MLA_COMPILE_GLUON=0 selects the Triton kernel). A second table
takes the small head counts (16, 32), where production runs the keys-major kernel: the heads-major
Gluon kernel forced there (its 64-row tile then half or three quarters padding) against the roofline
floor. The keys-major kernel is off throughout (keys_major_ab.py compares it).

    python benchmarks/hopper_ab.py [--small-heads-only] [--qreg]

--qreg: only the Gluon kernel's variants (Q_REG_CHUNKS pieces of Q in registers, DEFER_L) against FlashMLA.
"""
import datetime
import math
import os
import sys

import torch
import triton

os.environ["MLA_COMPILE_KEYS_MAJOR"] = "0"   # this script compares the heads-major kernel with the Triton one

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, R, bench, copy_rate, flash_mla_fn, fmt, inputs  # noqa: E402

from mla_compile.kernels import absorbed_decode_hopper as hopper  # noqa: E402
from mla_compile.kernels.absorbed_decode import absorbed_latent_attention  # noqa: E402


def both(fn):
    """(output, CUDA-graph time) of fn with the Triton kernel, then with the Gluon kernel."""
    res = {}
    for flag in ("0", "1"):
        os.environ["MLA_COMPILE_GLUON"] = flag
        res[flag] = (fn().float(), bench(fn, graph=True))
    d = ((res["0"][0] - res["1"][0]).abs().max() / res["0"][0].abs().max()).item()
    return res["0"][1], res["1"][1], d


def mask_table():
    print("| H | B | T | mask | Triton us | Gluon us | Gluon/Triton | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for H, B, T in ((128, 8, 4096), (128, 32, 4096), (128, 8, 16384)):
        x = inputs(B, H, 1, T)
        q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
        g = torch.Generator(device="cuda").manual_seed(3)
        for kind in ("none", "bool", "float"):
            m = None
            if kind == "bool":
                m = torch.rand(B, 1, 1, T, device="cuda", generator=g) > 0.1
            elif kind == "float":      # HF's additive mask: 0 or finfo.min
                m = torch.zeros(B, 1, 1, T, device="cuda", dtype=torch.bfloat16)
                m[..., T - 100:] = torch.finfo(torch.bfloat16).min
            fn = lambda: absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"], m,  # noqa: E731
                                                   1 / math.sqrt(DN + DR), False)
            tt, tg, d = both(fn)
            print(f"| {H} | {B} | {T} | {kind} | {fmt(tt)} | {fmt(tg)} | {tg / tt:.2f} | {d:.1e} |", flush=True)


def small_heads_table():
    bw = copy_rate()
    print(f"\nSmall head counts, no mask; floor = bytes / measured copy rate ({bw / 1e12:.2f} TB/s)\n")
    print("| H | B | T | Triton us | Gluon us | Gluon/Triton | floor us | floor/Triton | floor/Gluon | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    hopper.MIN_HEADS = 1
    for H in (16, 32):
        for B in (8, 32, 64):
            for T in (4096, 16384, 65536):
                if B * T > (1 << 21):
                    continue
                x = inputs(B, H, 1, T)
                q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
                fn = lambda: absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"], None,  # noqa: E731
                                                       1 / math.sqrt(DN + DR), False)
                tt, tg, d = both(fn)
                floor = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R) / bw * 1e6
                print(f"| {H} | {B} | {T} | {fmt(tt)} | {fmt(tg)} | {tg / tt:.2f} | {fmt(floor)} | "
                      f"{100 * floor / tt:.0f}% | {100 * floor / tg:.0f}% | {d:.1e} |", flush=True)
                del x, q
                torch.cuda.empty_cache()


VARIANTS = ((0, False), (2, False), (1, True), (2, True))   # (Q_REG_CHUNKS, DEFER_L)


def qreg_table():
    names = [f"q{n}{'+L' if d else ''}" for n, d in VARIANTS]
    print(f"Gluon variants: qN = N 64-column pieces of Q in registers, +L = row sums reduced after the loop\n")
    print(f"| H | B | T | FlashMLA us | {' | '.join(n + ' us' for n in names)} | best | best/FlashMLA | max rel diff |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|")
    os.environ["MLA_COMPILE_GLUON"] = "1"
    hopper.MIN_HEADS = 1
    saved = hopper.Q_REG_CHUNKS, hopper.DEFER_L
    for H, B, T in ((128, 8, 4096), (128, 8, 16384), (128, 32, 4096), (128, 64, 4096), (128, 32, 16384),
                    (32, 32, 16384), (32, 8, 65536)):
        x = inputs(B, H, 1, T)
        q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
        scale = 1 / math.sqrt(DN + DR)
        fm = None
        if H >= 64:
            fm = bench(flash_mla_fn(q, x["q_rope"], x["latent"], x["k_rope"], scale), graph=True)
        fn = lambda: absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"], None,  # noqa: E731
                                               scale, False)
        ts, outs = [], []
        for n, d in VARIANTS:
            hopper.Q_REG_CHUNKS, hopper.DEFER_L = n, d
            outs.append(fn().float())
            ts.append(bench(fn, graph=True))
        d = max(((o - outs[0]).abs().max() / outs[0].abs().max()).item() for o in outs[1:])
        best = min(range(len(ts)), key=lambda i: float("inf") if ts[i] is None else ts[i])
        print(f"| {H} | {B} | {T} | {fmt(fm)} | {' | '.join(fmt(t) for t in ts)} | {names[best]} | "
              f"{'n/a' if fm is None else f'{ts[best] / fm:.2f}'} | {d:.1e} |", flush=True)
        del x, q
        torch.cuda.empty_cache()
    hopper.Q_REG_CHUNKS, hopper.DEFER_L = saved


print(f"# {torch.cuda.get_device_name()}: absorbed core, Triton vs Gluon kernel (CUDA-graph replays, us)\n")
print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
      f"triton {triton.__version__}; command: `python benchmarks/hopper_ab.py {' '.join(sys.argv[1:])}`\n")
if "--qreg" in sys.argv:
    qreg_table()
else:
    if "--small-heads-only" not in sys.argv:
        mask_table()
    small_heads_table()
