"""Which fused Triton kernel runs a form on a device (the kernels live beside this module).

`kernel_for(form, device)` returns the kernel-backed implementation of a form for a device, or None
when the reference should run: kernels run on CUDA, and on any device under MLA_COMPILE_KERNELS=triton
(with TRITON_INTERPRET=1 on the CPU, which is how CI exercises them). MLA_COMPILE_KERNELS=reference
turns them off.
"""

from __future__ import annotations

import os

import torch

_KERNELS: dict = {}
_LOADED = False


def _load() -> None:
    """Import the kernel modules on first use, so that importing mla_compile never needs triton."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    try:
        from mla_compile.kernels.absorbed_decode import absorbed_decode
        from mla_compile.kernels.expanded_prefill import expanded_prefill
        from mla_compile.kernels.sparse_decode import sparse_absorbed_decode
    except Exception as e:  # triton missing or broken: the references run instead
        import warnings

        warnings.warn(f"mla_compile.kernels: Triton kernels unavailable ({type(e).__name__}: {e}); "
                      "using the reference forms", RuntimeWarning, stacklevel=3)
        return
    _KERNELS.update({
        "absorbed": absorbed_decode,
        "expanded": expanded_prefill,
        "sparse_absorbed": sparse_absorbed_decode,
        # sparse_expanded stays the reference.
    })


def kernel_for(form: str, device: torch.device):
    """The kernel for `form` on `device`, or None (run the reference). Any head and rank sizes: the
    kernels pad every dot operand to >= 16 (tl.dot's minimum on the GPU); checked on an H200 with the
    odd and tiny sizes of tests/test_kernels.py and 280 fuzz examples with MLA_COMPILE_KERNELS=triton."""
    choice = os.environ.get("MLA_COMPILE_KERNELS", "auto")
    if choice == "reference":
        return None
    if choice != "triton" and torch.device(device).type != "cuda":
        return None
    _load()
    return _KERNELS.get(form)
