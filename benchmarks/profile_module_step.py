"""Where one decode step of the attention module goes (issue 4): GPU kernels of a backend="mla" step.

    python benchmarks/profile_module_step.py [--point v3attn:8:4096]

The model and cache are generate.py's (v3attn: one V3 attention layer, MLP shrunk to 64; DynamicCache
holding T-1 random latents). The step is compiled with backend="mla" without CUDA graphs so that the
profiler sees every kernel (their GPU times are those the CUDA-graph replay runs); 3 warm-up steps,
then 5 profiled. Prints the GPU time per step by kernel, and the bytes floor: the attention module's
weights, the latent cache read once, DynamicCache's cat (the cache read and written), at the
measured copy rate. Writes benchmarks/results/module-step-profile-<device>.md (and to $OUT).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_forms import device_name, save_report  # noqa: E402
from generate import build, decode_step, fill_cache  # noqa: E402

STEPS = 5


def copy_rate(dev) -> float:
    """bytes/s of a large device copy (read + write), as bench_kernels.py measures it."""
    from triton.testing import do_bench

    x = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * x.numel() / (do_bench(lambda: y.copy_(x), rep=50, return_mode="median") * 1e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--point", default="v3attn:8:4096")
    args = ap.parse_args()
    import mla_compile  # noqa: F401

    dev = torch.device("cuda")
    mname, B, T = args.point.split(":")
    B, T = int(B), int(T)
    fam, cfg, model = build(mname, dev, torch.bfloat16, False)
    cache, saved = fill_cache(model, B, T, dev, torch.bfloat16)
    ids = torch.ones(B, 1, dtype=torch.long, device=dev)
    step = decode_step(torch.compile(model, backend="mla"), cache, saved, ids, mark=False)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t > 0:
            kernels[ev.key] = (ev.count / STEPS, t / STEPS)
    total = sum(t for _, t in kernels.values())

    attn = model.model.layers[0].self_attn
    w_bytes = sum(p.numel() * p.element_size() for p in attn.parameters())
    r, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    latent = B * (T - 1) * (r + dr) * 2
    rate = copy_rate(dev)
    floor = (w_bytes + latent + 2 * latent) / rate
    lines = [f"# Attention-module decode step, by GPU kernel: {device_name(dev)}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- torch {torch.__version__}; command: `python {' '.join(sys.argv)}`",
             f"- point {args.point}: {mname} (one attention layer, MLP 64), B={B}, context T={T}, DynamicCache; "
             "backend=\"mla\" without CUDA graphs (kernel times are those of the graph replay)",
             f"- GPU time per step: {total:.1f} us (sum of kernel times; {STEPS} steps profiled)",
             f"- bytes floor at the measured copy rate {rate / 1e12:.2f} TB/s: attention weights "
             f"{w_bytes / 1e6:.1f} MB + latent read {latent / 1e6:.1f} MB + DynamicCache cat (read + write) "
             f"{2 * latent / 1e6:.1f} MB = {floor * 1e6:.1f} us", "",
             "| kernel | calls / step | us / step | share |", "|---|---|---|---|"]
    for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name[:110].replace('|', '/')} | {n:g} | {t:.1f} | {t / total:.1%} |")
    save_report("\n".join(lines) + "\n", f"module-step-profile-{device_name(dev)}.md", (), os.environ.get("OUT"))


if __name__ == "__main__":
    main()
