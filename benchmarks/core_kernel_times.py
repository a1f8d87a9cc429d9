"""Where the absorbed core's time goes at the small points (issue 4's 80%-of-floor target at 16/32 heads):
per point, the CUDA-graph time of one call, the GPU time of each of its kernels (torch.profiler: the
split kernel and the merge of splits) and what is left between them (launch and drain gaps inside the
graph), with the merge in two passes and in one (absorbed_decode.MERGE_ONE_PASS).

    python benchmarks/core_kernel_times.py [--merge]

--merge: only the merge kernel, on random split outputs of those points' shapes, over its row-block
width RB and warp count (CUDA-graph replays).
"""
import datetime
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, R, bench, copy_rate, fmt, inputs  # noqa: E402

from mla_compile.kernels import absorbed_decode  # noqa: E402
from mla_compile.kernels.absorbed_decode import absorbed_latent_attention, choose_splits  # noqa: E402


def kernel_times(fn, reps: int = 20):
    """{kernel name: GPU us per call} over reps eager calls."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0)
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            out[ev.key] = t / reps
    return out


def main():
    bw = copy_rate()
    print(f"# {torch.cuda.get_device_name()}: absorbed core, kernel times at small points\n")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
          f"triton {triton.__version__}; command: `python benchmarks/core_kernel_times.py`")
    print(f"- floor = bytes / measured copy rate ({bw / 1e12:.2f} TB/s); graph = CUDA-graph replay (us); "
          "kernels = torch.profiler GPU time per call; gap = graph - sum of kernels\n")
    print("| H | B | T | splits | merge | graph us | split kernel us | merge us | gap us | floor us | floor/graph |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for H, B, T in ((32, 8, 1024), (32, 8, 4096), (32, 8, 16384), (32, 32, 4096), (16, 8, 4096), (16, 8, 16384),
                    (16, 32, 4096), (128, 8, 4096), (128, 8, 16384)):
        x = inputs(B, H, 1, T)
        q = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
        scale = 1 / math.sqrt(DN + DR)
        splits, _ = choose_splits(q.device, B, 1 if H <= 32 else triton.cdiv(H, 64), T)
        fn = lambda: absorbed_latent_attention(q, x["q_rope"], x["latent"], x["k_rope"], None,  # noqa: E731
                                               scale, False)
        floor = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R) / bw * 1e6
        outs = []
        for one_pass in (False, True):
            absorbed_decode.MERGE_ONE_PASS = one_pass
            outs.append(fn().float())
            g = bench(fn, graph=True)
            ks = kernel_times(fn)
            split = sum(v for k, v in ks.items() if "merge" not in k)
            merge = sum(v for k, v in ks.items() if "merge" in k)
            print(f"| {H} | {B} | {T} | {splits} | {'one pass' if one_pass else 'two passes'} | {fmt(g)} | "
                  f"{fmt(split)} | {fmt(merge)} | {fmt(g - split - merge)} | {fmt(floor)} | {100 * floor / g:.0f}% |",
                  flush=True)
        d = ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item()
        if d > 1e-2:
            print(f"  ! the two merges differ: max rel diff {d:.1e}", flush=True)
        del x, q
        torch.cuda.empty_cache()
    absorbed_decode.MERGE_ONE_PASS = True


def merge_table():
    print(f"# {torch.cuda.get_device_name()}: merge of splits alone, RB x num_warps (CUDA-graph replays, us)\n")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: "
          "`python benchmarks/core_kernel_times.py --merge`; default = the launcher's choice\n")
    configs = [(rb, w) for rb in (128, 256, 512) for w in (2, 4, 8)]
    print("| H | B | splits | default us | " + " | ".join(f"RB{rb} w{w}" for rb, w in configs) + " |")
    print("|---|---|---|---|" + "---|" * len(configs))
    g = torch.Generator(device="cuda").manual_seed(0)
    for H, B, P in ((32, 8, 4), (32, 8, 16), (32, 32, 4), (16, 8, 16), (16, 32, 4), (128, 8, 8)):
        o_part = torch.randn(B, P, H, R, device="cuda", generator=g)
        ml = torch.rand(B, P, H, 2, device="cuda", generator=g) + 0.5
        out = torch.empty(B, H, 1, R, device="cuda", dtype=torch.bfloat16)
        run = lambda rb=None, w=4: absorbed_decode.merge_splits(o_part, ml, out, 1, R, P, rb, w)  # noqa: E731
        run()
        ref = out.float().clone()
        ts = []
        for rb, w in configs:
            run(rb, w)
            assert (out.float() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()
            ts.append(bench(lambda: run(rb, w), graph=True))
        print(f"| {H} | {B} | {P} | {fmt(bench(run, graph=True))} | " + " | ".join(fmt(t) for t in ts) + " |",
              flush=True)


if __name__ == "__main__":
    merge_table() if "--merge" in sys.argv else main()
