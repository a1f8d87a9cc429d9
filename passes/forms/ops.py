"""The forms as torch.library ops: `torch.ops.mla.<form>`.

Each form is a `torch.library.triton_op` whose implementation takes a fused Triton kernel where
`mla_compile.kernels.registry` offers one for the device (CUDA, or any device with MLA_COMPILE_KERNELS=triton),
else the plain-torch reference, which runs on any device. Under torch.compile, Inductor traces a
CUDA call with static sizes down to its Triton launches; other calls go to the form's opaque twin
`mla.<form>_opaque` (see "The ops" below).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mla_compile.kernels.common import DENSE_FORMS, FORMS, SPARSE_FORMS  # noqa: F401  (the form names)
from mla_compile.kernels.registry import kernel_for
from mla_compile.passes.forms.absorbed import absorbed_reference
from mla_compile.passes.forms.common import check_topk_range, is_traced
from mla_compile.passes.forms.expanded import expanded_reference
from mla_compile.passes.forms.sparse import sparse_absorbed_reference, sparse_expanded_reference

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
    return kernel_for(form, q_nope) or _REFERENCES[form]


def _out_like(q_nope: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    B, H, S, _ = q_nope.shape
    return q_nope.new_empty(B, H, S, w_uv.shape[1])


def _dense(form, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens, sinks=None):
    """Run a dense form. kv_lens (int, [B] or a scalar): keys at or past it are not read. A static
    cache is allocated at its maximum length and HF masks the unfilled tail; with kv_lens the filled
    part alone is read. Kernels take kv_lens on the device; elsewhere the inputs are cut to its
    maximum (a host read, skipped while a CUDA graph is being captured: the mask keeps it exact)."""
    fn = implementation_for(form, q_nope)
    if kv_lens is None:
        return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, sinks=sinks)
    if getattr(fn, "accepts_kv_lens", False):
        return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens=kv_lens, sinks=sinks)
    capturing = q_nope.is_cuda and torch.cuda.is_current_stream_capturing()
    T = latent.shape[-2]
    n = T if capturing else int(kv_lens.max())
    if not 0 < n <= T:
        raise ValueError(f"kv_lens: valid lengths must lie in [1, T={T}], got max {n}")
    if n < T:
        latent, k_rope = latent[..., :n, :], k_rope[..., :n, :]
        if mask is not None and mask.shape[-1] == T:
            mask = mask[..., :n]
    return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, sinks=sinks)


# --------------------------------------------------------------------------------------------
# The ops. Each form is a `torch.library.triton_op`: called on real tensors it runs the kernel (or the
# reference) directly; when AOTAutograd traces it for Inductor, the body is traced too, so Inductor
# sees the Triton launches as its own user-defined kernels (no custom-op dispatch, no Python per call,
# the surrounding GEMMs and allocations planned with the rest of the graph). A call whose kernels cannot
# be traced exactly is handed to the same form's opaque twin, `mla::<form>_opaque` (a custom_op that
# Inductor calls as one black box):
#   - no Triton kernel for the device (CPU references; interpreted Triton under TRITON_INTERPRET=1);
#   - a symbolic size: the launchers pick grids, splits and autotuning keys from the sizes, which on
#     a symbolic key length would specialise it and recompile at every length;
#   - a static cache's fill length for a form whose kernel does not take it (the input is cut on the
#     host);
#   - a call that takes a Gluon kernel (the absorbed form's Hopper kernels): wrap_triton takes Triton's
#     JIT functions only.


def traceable(form: str, q_nope: torch.Tensor, args, kv_lens=None) -> bool:
    """Whether this traced call (the op's arguments) may be inlined as Triton launches (see above)."""
    if q_nope.device.type != "cuda" or is_interpreted():
        return False
    fn = kernel_for(form, q_nope)
    if fn is None or (kv_lens is not None and not getattr(fn, "accepts_kv_lens", False)):
        return False
    inlinable = getattr(fn, "inlinable", None)
    if inlinable is not None and not inlinable(*args):
        return False
    return all(has_static_sizes(t) for t in args if isinstance(t, torch.Tensor))


def is_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_static_sizes(t: torch.Tensor) -> bool:
    return all(isinstance(n, int) for n in (*t.shape, *t.stride()))


_DENSE_SCHEMA_DOC = ("(q_nope [B,H,S,dn], q_rope [B,H,S,dr], latent [B,(1,)T,r], k_rope [B,(1,)T,dr], "
                     "W_UK [H,dn,r], W_UV [H,dv,r], mask, scale, is_causal, kv_lens, sinks [H]) -> [B,H,S,dv]")


def _register(form: str, body: Callable, run: Callable):
    """mla::<form> as a triton_op of `body`, and its opaque twin mla::<form>_opaque running `run` (the
    implementation on real tensors, which `body` also calls when it is not traced)."""
    body.__name__, run.__name__ = form, f"{form}_opaque"
    op = torch.library.triton_op(f"mla::{form}", body, mutates_args=())
    twin = torch.library.custom_op(f"mla::{form}_opaque", run, mutates_args=())
    twin.register_fake(_fake_out)
    return op


def _fake_out(q_nope, q_rope, latent, k_rope, w_uk, w_uv, *rest, **kwargs):
    """The twins' fake: every form's output is [B, H, S, dv]; the arguments after W_UV differ by form."""
    return _out_like(q_nope, w_uv)


def _dense_op(form: str):
    def run(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
            w_uk: torch.Tensor, w_uv: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
            is_causal: bool, kv_lens: Optional[torch.Tensor] = None,
            sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _dense(form, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens, sinks)

    def body(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
             w_uk: torch.Tensor, w_uv: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
             is_causal: bool, kv_lens: Optional[torch.Tensor] = None,
             sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        args = (q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens, sinks)
        if is_traced(q_nope) and not traceable(form, q_nope, args, kv_lens):
            return getattr(torch.ops.mla, f"{form}_opaque")(*args)
        return run(*args)

    body.__doc__ = run.__doc__ = f"mla.{form} {_DENSE_SCHEMA_DOC}"
    return _register(form, body, run)


def _sparse_op(form: str):
    def run(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
            w_uk: torch.Tensor, w_uv: torch.Tensor, topk_indices: torch.Tensor,
            mask: Optional[torch.Tensor], scale: float, is_causal: bool,
            sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        fn = implementation_for(form, q_nope)
        return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal, sinks=sinks)

    def body(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
             w_uk: torch.Tensor, w_uv: torch.Tensor, topk_indices: torch.Tensor,
             mask: Optional[torch.Tensor], scale: float, is_causal: bool,
             sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        args = [q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal, sinks]
        if is_traced(q_nope):
            if not traceable(form, q_nope, args):
                return getattr(torch.ops.mla, f"{form}_opaque")(*args)
            # The index range check reads values, which a traced kernel cannot: one opaque op does it
            # at run time and hands the kernel its int32 copy of the indices.
            args[6] = torch.ops.mla.checked_topk(topk_indices, latent.shape[-2])
        return run(*args)

    return _register(form, body, run)


@torch.library.custom_op("mla::checked_topk", mutates_args=())
def checked_topk(topk_indices: torch.Tensor, kv_len: int) -> torch.Tensor:
    """topk_indices [B, S, k] with every value in [-1, kv_len), as a fresh int32 tensor; else ValueError
    naming the range (not read while a CUDA graph is captured: the warm-up calls before capture were)."""
    check_topk_range(topk_indices, kv_len)
    return topk_indices.to(torch.int32, memory_format=torch.contiguous_format, copy=True)


@checked_topk.register_fake
def _(topk_indices, kv_len):
    return topk_indices.new_empty(topk_indices.shape, dtype=torch.int32)


expanded = _dense_op("expanded")
absorbed = _dense_op("absorbed")
sparse_absorbed = _sparse_op("sparse_absorbed")
sparse_expanded = _sparse_op("sparse_expanded")


def op_for(form: str):
    """The OpOverload the rewrite emits for a form."""
    return getattr(torch.ops.mla, form).default
