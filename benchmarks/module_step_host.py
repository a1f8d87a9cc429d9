"""Where the wall time of a CUDA-graph decode step goes beyond its kernels (issue 4's module step).

    python benchmarks/module_step_host.py [--point v3attn:8:4096] [--systems mla,Inductor]

generate.py times the step back to back under mode="reduce-overhead" (CUDA-graph trees). The kernels
alone (profile_module_step.py) take less than that wall time. This script splits a step, for each
system, into:

- wall: CUDA events around back-to-back steps (as generate.py);
- host: the CPU time of one call, the GPU idle before it (synchronised first), median of 30: Dynamo's
  guards, the AOT wrapper, the CUDA-graph tree's bookkeeping and its launch;
- replay kernels: torch.profiler over 5 replays (CUPTI sees the kernels inside a graph), by kernel,
  with the copies a CUDA-graph tree makes of inputs it does not own;
- the same three with the cache's tensors marked static (torch._dynamo.mark_static_address): the tree
  then reads them where they are instead of copying them into its pool each replay. In a real decode
  loop the cache fed to a step is the previous replay's output, which the tree already owns, so this
  is the loop's case; generate.py puts back the same random tensors before every step.

Writes benchmarks/results/module-step-host-<device>.md (and to $OUT).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_forms import device_name, save_report, time_events  # noqa: E402
from generate import build, decode_step, fill_cache  # noqa: E402
from profile_module_step import profile_steps  # noqa: E402


def host_us(step, n=30):
    """Median CPU time of one call that starts on an idle GPU (us)."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def measure(model, backend, B, T, dev, static_cache):
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    cache, saved = fill_cache(model, B, T, dev, torch.bfloat16, static=static_cache)
    fn = torch.compile(model, backend=backend, mode="reduce-overhead")
    step = decode_step(fn, cache, saved, torch.ones(B, 1, dtype=torch.long, device=dev), mark=True)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    wall = min(time_events(step, 50) for _ in range(3)) * 1e6
    host = host_us(step)
    kernels, _ = profile_steps(step, 5)
    return wall, host, kernels, launched_by(step)


def launched_by(step, steps=3):
    """The host ops under which GPU time was spent, per step (device time of the op and its children):
    tells a copy the CUDA-graph tree makes before its replay (under aten::copy_ / _foreach_copy_) from
    one inside the graph (under cudaGraphLaunch)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows, cpu = [], []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0) or 0
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CPU:
            rows.append((ev.key, ev.count / steps, t / steps))
        if ev.device_type == torch.autograd.DeviceType.CPU and ev.cpu_time_total > 0:
            cpu.append((ev.key, ev.count / steps, ev.cpu_time_total / steps))
    return sorted(rows, key=lambda r: -r[2])[:10], sorted(cpu, key=lambda r: -r[2])[:12]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--point", default="v3attn:8:4096")
    ap.add_argument("--systems", default="mla,Inductor")
    args = ap.parse_args()
    import mla_compile  # noqa: F401

    dyn = torch._dynamo.config
    dyn.automatic_dynamic_shapes = False
    # The second compile of a system would otherwise come from the FX-graph / AOT caches, keyed without
    # which inputs are static: the cache-static run then copied the cache all the same (seen at 00:18 UTC).
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    dev = torch.device("cuda")
    mname, B, T = args.point.split(":")
    B, T = int(B), int(T)
    _, _, model = build(mname, dev, torch.bfloat16, False)
    backends = {"mla": "mla", "Inductor": "inductor"}
    rows, details = [], []
    for sysname in args.systems.split(","):
        for static in (False, True):
            wall, host, kernels, hosts = measure(model, backends[sysname], B, T, dev, static)
            gpu = sum(t for _, t in kernels.values())
            copies = sum(t for k, (_, t) in kernels.items() if "memcpy" in k.lower() or "copy_kernel" in k)
            label = f"{sysname}, cache {'static' if static else 'copied'}"
            rows.append(f"| {label} | {wall:.1f} | {host:.1f} | {gpu:.1f} | {copies:.1f} |")
            print(rows[-1], flush=True)
            details += ["", f"### {label}: kernels of one replay (top 12)", "", "| kernel | calls | us |", "|---|---|---|"]
            for k, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]:
                details.append(f"| {k[:100].replace('|', '/')} | {n:g} | {t:.1f} |")
            details += ["", f"GPU time by the host op that launched it ({label})", "", "| host op | calls | GPU us |",
                        "|---|---|---|"]
            details += [f"| {k[:100].replace('|', '/')} | {n:g} | {t:.1f} |" for k, n, t in hosts[0]]
            details += ["", f"Host ops by CPU time, children included ({label}; under the profiler, which adds its own)",
                        "", "| host op | calls | CPU us |", "|---|---|---|"]
            details += [f"| {k[:100].replace('|', '/')} | {n:g} | {t:.1f} |" for k, n, t in hosts[1]]
    lines = [f"# Decode step under CUDA graphs: wall, host and replay time: {device_name(dev)}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- torch {torch.__version__}; command: `python {' '.join(sys.argv)}`",
             f"- point {args.point} (generate.py's model and DynamicCache), bf16, mode=\"reduce-overhead\"",
             "- wall: CUDA events over 50 back-to-back steps, best of 3; host: median CPU time of one call on an "
             "idle GPU (30 calls); replay GPU: the kernels of one replay (torch.profiler, 5 replays); copies: "
             "the non-Triton copy kernels among them (the tree's input copies)", "",
             "| system | wall us | host us | replay GPU us | copies us |", "|---|---|---|---|---|", *rows, *details]
    save_report("\n".join(lines) + "\n", f"module-step-host-{device_name(dev)}.md", (), os.environ.get("OUT"))


if __name__ == "__main__":
    main()
