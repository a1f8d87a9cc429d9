"""Why the absorbed decode kernel is where it is at H=128: the autotuner's pick, registers/spills, and an
Nsight Compute window around one launch (run under `ncu --profile-from-start off`). On Hopper the
Gluon kernels (absorbed_decode_hopper above 32 heads, absorbed_decode_keys_major at <= 32) run where they
apply; MLA_COMPILE_GLUON=0 profiles the Triton one.

    python benchmarks/profile_absorbed.py [B] [T] [H]
"""
import math
import sys

import torch

from mla_compile.kernels.absorbed_decode import _absorbed_split_kernel, absorbed_latent_attention
from mla_compile.kernels.absorbed_decode_hopper import HAVE_GLUON

B, T, H = (int(a) for a in (sys.argv[1:4] + ["32", "16384", "128"][len(sys.argv[1:4]):]))
dt, dev = torch.bfloat16, "cuda"
q = torch.randn(B, H, 1, 512, device=dev, dtype=dt)
qr = torch.randn(B, H, 1, 64, device=dev, dtype=dt)
c = torch.randn(B, 1, T, 512, device=dev, dtype=dt)
kr = torch.randn(B, 1, T, 64, device=dev, dtype=dt)
fn = lambda: absorbed_latent_attention(q, qr, c, kr, None, 1 / math.sqrt(192), False)  # noqa: E731
fn()
torch.cuda.synchronize()
kernels = [_absorbed_split_kernel.fn]
if HAVE_GLUON:
    from mla_compile.kernels.absorbed_decode_hopper import _hopper_split_kernel
    from mla_compile.kernels.absorbed_decode_keys_major import _keys_major_split_kernel
    kernels += [_hopper_split_kernel, _keys_major_split_kernel]
print("Triton kernel's best config:", getattr(_absorbed_split_kernel, "best_config", "(not run)"))
compiled = [k for jit in kernels for k in jit.device_caches[torch.cuda.current_device()][0].values()]
for k in compiled[:8]:
    try:
        print("compiled:", k.metadata.num_warps, k.metadata.num_stages, "regs", k.n_regs, "spills", k.n_spills,
              "smem", k.metadata.shared)
    except Exception as e:  # noqa: BLE001
        print("compiled: ?", type(e).__name__, e)
torch.cuda.profiler.start()
fn()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
