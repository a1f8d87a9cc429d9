"""Fused Triton kernels for the MLA forms (installed as mla_compile.kernels).

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


def dims_supported(dims) -> bool:
    """The kernels are validated on the GPU for head and rank sizes that are multiples of 16 (every
    released MLA model: r=512, dn=dv=128, dr=64 or 0). Smaller or odd sizes (tiny test configs) hit
    tl.dot's K >= 16 limit or untested padding paths on the GPU, so the reference runs for them."""
    r, dn, dr, dv = dims
    return all(d >= 16 and d % 16 == 0 for d in (r, dn, dv)) and (dr == 0 or (dr >= 16 and dr % 16 == 0))


def kernel_for(form: str, device: torch.device, dims=None):
    """The kernel for `form` on `device`, or None (run the reference). dims = (r, dn, dr, dv)."""
    choice = os.environ.get("MLA_COMPILE_KERNELS", "auto")
    if choice == "reference":
        return None
    if choice != "triton" and torch.device(device).type != "cuda":
        return None
    if dims is not None and choice != "triton" and not dims_supported(dims):
        return None
    _load()
    return _KERNELS.get(form)
