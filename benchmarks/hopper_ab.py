"""The absorbed core with the Hopper (Gluon) kernel against the Triton kernel, same inputs, with and
without HF's decode mask (GPU only; MLA_COMPILE_GLUON=0 selects the Triton kernel).

    python benchmarks/hopper_ab.py
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, bench, fmt, inputs  # noqa: E402

from mla_compile.kernels.absorbed_decode import absorbed_latent_attention  # noqa: E402

print(f"# {torch.cuda.get_device_name()}: absorbed core, Triton vs Gluon kernel (CUDA-graph replays, us)\n")
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
        res = {}
        for flag in ("0", "1"):
            os.environ["MLA_COMPILE_GLUON"] = flag
            res[flag] = (fn().float(), bench(fn, graph=True))
        d = ((res["0"][0] - res["1"][0]).abs().max() / res["0"][0].abs().max()).item()
        print(f"| {H} | {B} | {T} | {kind} | {fmt(res['0'][1])} | {fmt(res['1'][1])} | "
              f"{res['1'][1] / res['0'][1]:.2f} | {d:.1e} |", flush=True)
