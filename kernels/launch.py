"""How the launchers start a Triton kernel: directly, or through `torch.library.wrap_triton` while the
op around them is traced.

The forms are `torch.library.triton_op`s. When AOTAutograd traces one for Inductor, its body runs on
fake/functional tensors, and each launch must become a `triton_kernel_wrapper` node that Inductor
compiles as its own user-defined kernel. On real tensors the kernel is launched as is: wrap_triton's
higher-order-op dispatch would only add host time.
"""

from __future__ import annotations

import torch

from mla_compile.passes.forms.common import is_traced


def launcher(kernel, like: torch.Tensor):
    """`kernel`, or its traceable wrapper when `like` is a tracer's stand-in; index it with the grid."""
    if is_traced(like):
        return torch.library.wrap_triton(kernel)
    return kernel
