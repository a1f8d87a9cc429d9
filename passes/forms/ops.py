"""The forms as torch.library ops: `torch.ops.mla.<form>`.

Each op has a fake function (for Dynamo, AOTAutograd and Inductor, which treat it as one opaque
call) and an implementation that takes a fused Triton kernel where `mla_compile.kernels` offers one
for the device (CUDA, or any device with MLA_COMPILE_KERNELS=triton), else the plain-torch
reference, which runs on any device.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mla_compile.passes.forms.absorbed import absorbed_reference
from mla_compile.passes.forms.expanded import expanded_reference
from mla_compile.passes.forms.sparse import sparse_absorbed_reference, sparse_expanded_reference

DENSE_FORMS = ("expanded", "absorbed")
SPARSE_FORMS = ("sparse_absorbed", "sparse_expanded")
FORMS = DENSE_FORMS + SPARSE_FORMS

_REFERENCES: dict[str, Callable] = {
    "expanded": expanded_reference,
    "absorbed": absorbed_reference,
    "sparse_absorbed": sparse_absorbed_reference,
    "sparse_expanded": sparse_expanded_reference,
}


def reference_for(form: str) -> Callable:
    return _REFERENCES[form]


def implementation_for(form: str, q_nope: torch.Tensor) -> Callable:
    """The fused kernel of `form` for these tensors' device where one exists, else the reference."""
    from mla_compile.kernels import kernel_for

    return kernel_for(form, q_nope.device) or _REFERENCES[form]


def _out_like(q_nope: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    B, H, S, _ = q_nope.shape
    return q_nope.new_empty(B, H, S, w_uv.shape[1])


def _dense(form, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens):
    """Run a dense form. kv_lens (int, [B] or a scalar): keys at or past it are not read. A static
    cache is allocated at its maximum length and HF masks the unfilled tail; with kv_lens the filled
    part alone is read. Kernels take kv_lens on the device; elsewhere the inputs are cut to its
    maximum (a host read, skipped while a CUDA graph is being captured: the mask keeps it exact)."""
    fn = implementation_for(form, q_nope)
    if kv_lens is None:
        return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal)
    if getattr(fn, "accepts_kv_lens", False):
        return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens=kv_lens)
    capturing = q_nope.is_cuda and torch.cuda.is_current_stream_capturing()
    T = latent.shape[-2]
    n = T if capturing else int(kv_lens.max())
    if not 0 < n <= T:
        raise ValueError(f"kv_lens: valid lengths must lie in [1, T={T}], got max {n}")
    if n < T:
        latent, k_rope = latent[..., :n, :], k_rope[..., :n, :]
        if mask is not None and mask.shape[-1] == T:
            mask = mask[..., :n]
    return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal)


@torch.library.custom_op("mla::expanded", mutates_args=())
def expanded(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
             w_uk: torch.Tensor, w_uv: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
             is_causal: bool, kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _dense("expanded", q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens)


@torch.library.custom_op("mla::absorbed", mutates_args=())
def absorbed(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
             w_uk: torch.Tensor, w_uv: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
             is_causal: bool, kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _dense("absorbed", q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens)


@torch.library.custom_op("mla::sparse_absorbed", mutates_args=())
def sparse_absorbed(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                    w_uk: torch.Tensor, w_uv: torch.Tensor, topk_indices: torch.Tensor,
                    mask: Optional[torch.Tensor], scale: float, is_causal: bool) -> torch.Tensor:
    fn = implementation_for("sparse_absorbed", q_nope)
    return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal)


@torch.library.custom_op("mla::sparse_expanded", mutates_args=())
def sparse_expanded(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                    w_uk: torch.Tensor, w_uv: torch.Tensor, topk_indices: torch.Tensor,
                    mask: Optional[torch.Tensor], scale: float, is_causal: bool) -> torch.Tensor:
    fn = implementation_for("sparse_expanded", q_nope)
    return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal)


@expanded.register_fake
def _(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens=None):
    return _out_like(q_nope, w_uv)


@absorbed.register_fake
def _(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens=None):
    return _out_like(q_nope, w_uv)


@sparse_absorbed.register_fake
def _(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal):
    return _out_like(q_nope, w_uv)


@sparse_expanded.register_fake
def _(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal):
    return _out_like(q_nope, w_uv)


def op_for(form: str):
    """The OpOverload the rewrite emits for a form."""
    return getattr(torch.ops.mla, form).default
