"""Where one decode step of the attention module goes (issue 4): GPU kernels of a backend="mla" step.

    python benchmarks/profile_module_step.py [--point v3attn:8:4096] [--prefill]

The model and cache are generate.py's (v3attn: one V3 attention layer, MLP shrunk to 64; DynamicCache
holding T-1 random latents). The step is compiled with backend="mla" without CUDA graphs so that the
profiler sees every kernel (their GPU times are those the CUDA-graph replay runs); 3 warm-up steps,
then 5 profiled. Prints the GPU time per step by kernel, and the bytes floor: the attention module's
weights, the latent cache read once, DynamicCache's cat (the cache read and written), at the
measured copy rate. --prefill: the point's T is a prompt length from an empty cache instead, and the
report adds the step's wall time (is it bound by the CPU?) and the host-side ops by self CPU time.
Writes benchmarks/results/module-step-profile-<device>[-prefill].md (and to $OUT).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_forms import device_name, save_report  # noqa: E402
from bench_kernels import copy_rate  # noqa: E402
from generate import build, decode_step, fill_cache, prefill_step  # noqa: E402

STEPS = 5


def profile_steps(step, steps: int, host: bool = False):
    """torch.profiler over `steps` calls of step: ({kernel: (calls, GPU us)}, {host op: (calls, self CPU
    us)}), both per step; host ops only with host=True."""
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if host else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels, ops = {}, {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.key] = (ev.count / steps, t / steps)
        elif ev.self_cpu_time_total > 0:
            ops[ev.key] = (ev.count / steps, ev.self_cpu_time_total / steps)
    return kernels, ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--point", default="v3attn:8:4096")
    ap.add_argument("--prefill", action="store_true")
    args = ap.parse_args()
    import mla_compile  # noqa: F401

    dev = torch.device("cuda")
    mname, B, T = args.point.split(":")
    B, T = int(B), int(T)
    fam, cfg, model = build(mname, dev, torch.bfloat16, False)
    fn = torch.compile(model, backend="mla")
    if args.prefill:
        step = prefill_step(fn, torch.randint(3, cfg.vocab_size, (B, T), device=dev))
    else:
        cache, saved = fill_cache(model, B, T, dev, torch.bfloat16)
        step = decode_step(fn, cache, saved, torch.ones(B, 1, dtype=torch.long, device=dev), mark=False)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 20 * 1e6
    kernels, host = profile_steps(step, STEPS, host=args.prefill)
    total = sum(t for _, t in kernels.values())

    phase = f"prefill of {T} tokens, empty cache" if args.prefill else f"decode, context T={T}, DynamicCache"
    lines = [f"# One {'prefill' if args.prefill else 'decode'} step, by GPU kernel: {device_name(dev)}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- torch {torch.__version__}; command: `python {' '.join(sys.argv)}`",
             f"- point {args.point}: {mname}, B={B}, {phase}; "
             "backend=\"mla\" without CUDA graphs (kernel times are those of the graph replay)",
             f"- GPU time per step: {total:.1f} us (sum of kernel times; {STEPS} steps profiled); wall time per "
             f"step {wall:.1f} us (20 steps back to back, not profiled)"]
    if not args.prefill:
        attn = model.model.layers[0].self_attn
        w_bytes = sum(p.numel() * p.element_size() for p in attn.parameters())
        latent = B * (T - 1) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
        rate = copy_rate()
        floor = (w_bytes + latent + 2 * latent) / rate
        lines.append(f"- bytes floor of one attention layer at the measured copy rate {rate / 1e12:.2f} TB/s: weights "
                     f"{w_bytes / 1e6:.1f} MB + latent read {latent / 1e6:.1f} MB + DynamicCache cat (read + write) "
                     f"{2 * latent / 1e6:.1f} MB = {floor * 1e6:.1f} us")
    lines += ["",
              "| kernel | calls / step | us / step | share |", "|---|---|---|---|"]
    for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name[:110].replace('|', '/')} | {n:g} | {t:.1f} | {t / total:.1%} |")
    if host:
        lines += ["", "Host side, by self CPU time (top 25):", "", "| op | calls / step | self CPU us / step |",
                  "|---|---|---|"]
        for name, (n, t) in sorted(host.items(), key=lambda kv: -kv[1][1])[:25]:
            lines.append(f"| {name[:110].replace('|', '/')} | {n:g} | {t:.1f} |")
    tag = "-prefill" if args.prefill else ""
    save_report("\n".join(lines) + "\n", f"module-step-profile-{device_name(dev)}{tag}.md", (), os.environ.get("OUT"))


if __name__ == "__main__":
    main()
