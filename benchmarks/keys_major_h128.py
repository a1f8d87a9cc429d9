"""Does the keys-major absorbed kernel help at H=128 too? (GPU only; one table, CUDA-graph replays.)

    python benchmarks/keys_major_h128.py
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, bench, fmt, inputs  # noqa: E402

from mla_compile.kernels.absorbed_decode import absorbed_latent_attention  # noqa: E402

print("| H | B | T | rows-major us | keys-major us | max rel diff |")
print("|---|---|---|---|---|---|")
for H, B, T in ((128, 8, 4096), (128, 32, 16384), (64, 8, 4096), (40, 8, 4096)):
    x = inputs(B, H, 1, T)
    q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
    f = [lambda km=km: absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"], None,
                                                 1 / math.sqrt(DN + DR), False, keys_major=km) for km in (False, True)]
    a, b = f[0]().float(), f[1]().float()
    d = ((a - b).abs().max() / a.abs().max()).item()
    print(f"| {H} | {B} | {T} | {fmt(bench(f[0], graph=True))} | {fmt(bench(f[1], graph=True))} | {d:.1e} |", flush=True)
