"""Why expanded prefill with HF's float causal mask is slower than with is_causal (issue 4: 3.3x Inductor
against 4.2x): per variant, the time (do_bench, L2 flushed, as bench_kernels.py), the GPU time of each
kernel (torch.profiler: the expansion GEMM, the mask's block map, the attention kernel), the
autotuner's pick and the attention kernel's registers and spills.

    python benchmarks/prefill_mask_profile.py
"""
import datetime
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DN, DR, DT, bench, fmt, inputs  # noqa: E402
from core_kernel_times import kernel_times  # noqa: E402

from mla_compile.kernels import expanded_prefill as ep  # noqa: E402


def compiled_info():
    out = []
    for k in ep._expanded_fwd_kernel.fn.device_caches[torch.cuda.current_device()][0].values():
        try:
            out.append(f"regs {k.n_regs} spills {k.n_spills} warps {k.metadata.num_warps} stages {k.metadata.num_stages}")
        except Exception as e:  # noqa: BLE001
            out.append(f"? {type(e).__name__}")
    return out


def main():
    print(f"# {torch.cuda.get_device_name()}: expanded prefill, float causal mask against is_causal\n")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
          f"triton {triton.__version__}; command: `python benchmarks/prefill_mask_profile.py`; B=1, S=T=4096, bf16\n")
    print("| H | variant | us | kernels (us) | autotuner pick | max rel diff to is_causal |")
    print("|---|---|---|---|---|---|")
    B, S = 1, 4096
    scale = 1 / math.sqrt(DN + DR)
    for H in (128, 32):
        x = inputs(B, H, S, S)
        fmask = torch.full((S, S), torch.finfo(DT).min, device="cuda", dtype=DT).triu(1)[None, None]
        a = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"])
        ref = None
        for name, mask, causal in (("is_causal", None, True), ("HF float causal mask", fmask, False)):
            fn = lambda: ep.expanded_prefill(*a, mask, scale, causal)  # noqa: E731
            o = fn().float()
            ref = o if ref is None else ref
            d = ((o - ref).abs().max() / ref.abs().max()).item()
            t = bench(fn)
            ks = kernel_times(fn, reps=5)
            pick = getattr(ep._expanded_fwd_kernel, "best_config", "?")
            kstr = ", ".join(f"{k[:40]} {v:.0f}" for k, v in sorted(ks.items(), key=lambda kv: -kv[1]))
            print(f"| {H} | {name} | {fmt(t)} | {kstr} | {pick} | {d:.1e} |", flush=True)
        del x, fmask
        torch.cuda.empty_cache()
    print("\ncompiled attention kernels:", *compiled_info(), sep="\n- ")


if __name__ == "__main__":
    main()
