"""Which kernel runs: the one place that answers it, for the ops (`passes`) and the cost model (`cost`).

`kernel_for(form, like)` is the kernel-backed implementation of a form for tensors like `like`, or
None where the plain-torch reference runs: kernels take float16/bfloat16/float32 on CUDA, and on
any device under MLA_COMPILE_KERNELS=triton (with TRITON_INTERPRET=1 on the CPU, which is how CI
exercises them); MLA_COMPILE_KERNELS=reference turns them off. The option is read once, at the
first call after import or `mla_compile.reset()`.

`absorbed_core(dtype, H, S, r, dr, is_causal, sm90=...)` names the kernel that runs the absorbed
form's attention core for those sizes: "keys_major" (Hopper Gluon, at most 32 heads), "seesaw"
(Hopper Gluon, more than 32 heads) or "triton" (everywhere else). The absorbed op launches what it
says, and the cost model costs what it says, from sizes alone (a device table has no tensors).
"""

from __future__ import annotations

import os

import torch

from mla_compile.kernels.common import FORMS

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ABSORBED_CORES = ("keys_major", "seesaw", "triton")

_KERNELS: dict = {}
_LOADED = False
_OPTION: list = []       # MLA_COMPILE_KERNELS as read once: "auto", "triton" or "reference"


def reset() -> None:
    """Read MLA_COMPILE_KERNELS again at the next call (mla_compile.reset() calls this)."""
    _OPTION.clear()


def kernels_option() -> str:
    if not _OPTION:
        choice = os.environ.get("MLA_COMPILE_KERNELS", "auto")
        if choice not in ("auto", "triton", "reference"):
            raise ValueError(f"MLA_COMPILE_KERNELS={choice!r}: expected 'auto', 'triton' or 'reference'")
        _OPTION.append(choice)
    return _OPTION[0]


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


def kernel_for(form: str, like: torch.Tensor):
    """The kernel for `form` on tensors like `like` (its device and dtype), or None (run the reference).
    Any head and rank sizes: the kernels pad every dot operand to >= 16 (tl.dot's minimum on the GPU)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    choice = kernels_option()
    if choice == "reference" or like.dtype not in KERNEL_DTYPES or like.device.type == "meta":
        return None
    if choice != "triton" and like.device.type != "cuda":
        return None
    _load()
    return _KERNELS.get(form)


def absorbed_core(dtype: torch.dtype, H: int, S: int, r: int, dr: int, is_causal: bool, *, sm90: bool) -> str:
    """Which kernel runs the absorbed core at these sizes ("keys_major", "seesaw" or "triton"); `sm90`:
    the call runs on a Hopper GPU. A traced call on fake tensors can be asked too; a real call also
    needs TMA-compatible strides (`sm90.tma_ready`), else it takes the Triton kernel."""
    if not sm90 or is_causal or S != 1:
        return "triton"
    from mla_compile.kernels import absorbed_decode_keys_major as keys_major
    from mla_compile.kernels import absorbed_decode_seesaw as seesaw
    from mla_compile.kernels import sm90 as hopper

    if not hopper.HAVE_GLUON:
        return "triton"
    if keys_major.takes_sizes(dtype, H, S, r, dr, is_causal):
        return "keys_major"
    if seesaw.takes_sizes(dtype, H, S, r, dr, is_causal):
        return "seesaw"
    return "triton"


def is_sm90(device: torch.device) -> bool:
    """A Hopper GPU (what the Gluon kernels are written for)."""
    if torch.device(device).type != "cuda":
        return False
    from mla_compile.kernels import sm90

    return sm90.is_sm90(torch.device(device))
