"""The absorbed op inlined into Inductor's code (triton_op, Inductor's autotuner) against the same
op called as one opaque custom op (mla.absorbed_opaque, our autotuner), V3 shapes, bf16, CUDA-graph
replay medians (us). GPU only.    python benchmarks/inline_vs_opaque.py [--explain]

--explain: for H=128, B=32, T=4096, print Inductor's generated code (the launch lines) and the GPU
kernels of both paths (torch.profiler), to see where the inlined op's time goes."""

from __future__ import annotations

import math
import os
import sys

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, inputs  # noqa: E402

import mla_compile.passes.forms  # noqa: E402,F401


def kernel_table(fn, steps=5):
    from profile_module_step import profile_steps

    fn()
    kernels, _ = profile_steps(fn, steps)
    for name, (calls, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"| {name[:90]} | {calls:g} | {us:.1f} |")


def explain():
    from torch._inductor.utils import run_and_get_code

    H, B, T = 128, 32, 4096
    x = inputs(B, H, 1, T)
    args = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"], None,
            1 / math.sqrt(DN + DR), False)
    torch._dynamo.reset()
    inl = torch.compile(lambda *a: torch.ops.mla.absorbed(*a), backend="inductor", fullgraph=True)
    _, code = run_and_get_code(inl, *args)
    for src in code:
        for line in src.splitlines():
            if any(k in line for k in ("extern_kernels", ".run(", "empty_strided", "configs=", "Config(",
                                        "triton_meta", "reinterpret_tensor", "def call")):
                print(line.strip()[:240])
    print("\ninlined, GPU kernels per call (us):")
    kernel_table(lambda: inl(*args))
    print("\nopaque, GPU kernels per call (us):")
    kernel_table(lambda: torch.ops.mla.absorbed_opaque(*args))


def main():
    if "--explain" in sys.argv:
        return explain()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| H | B | T | inlined (Inductor) us | opaque (custom op) us |")
    print("|---|---|---|---|---|")
    scale = 1 / math.sqrt(DN + DR)
    for H, B, T in [(128, 8, 4096), (128, 32, 4096), (128, 1, 16384), (16, 8, 4096)]:
        x = inputs(B, H, 1, T)
        args = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"], None, scale, False)
        torch._dynamo.reset()
        inl = torch.compile(lambda *a: torch.ops.mla.absorbed(*a), backend="inductor", fullgraph=True)
        opq = lambda: torch.ops.mla.absorbed_opaque(*args)  # noqa: E731
        inl(*args)
        opq()
        t_i = do_bench_cudagraph(lambda: inl(*args), rep=100, return_mode="median") * 1e3
        t_o = do_bench_cudagraph(opq, rep=100, return_mode="median") * 1e3
        print(f"| {H} | {B} | {T} | {t_i:.1f} | {t_o:.1f} |", flush=True)


if __name__ == "__main__":
    main()
