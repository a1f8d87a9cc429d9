"""Run-time dispatch for dynamic shapes: `torch.ops.mla.auto` picks the form on the actual sizes.

When Dynamo hands the backend a graph whose query or key length is symbolic, the decision cannot be
made at compile time. The backend registers a chooser (sizes -> form), derived once from the cost
model's closed-form crossover, and emits `mla.auto(..., plan_id)`. Each call evaluates the chooser
on the real B, S, T (a few float operations) and runs that form's implementation, so one compiled
graph serves every length: no recompilation as the cache grows.

A DSA region passes its base mask and the top-k indices; a dense form under the base mask is exact
when the selection covers every key (k >= T); otherwise the selection is applied as a dense mask.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch._library.autograd import Info as AutogradInfo, make_autograd_impl

from mla_compile.passes.forms.autograd import dense_backward, sparse_backward
from mla_compile.passes.forms.ops import SPARSE_FORMS, implementation_for
from mla_compile.passes.forms.sparse import mask_outside_topk


@dataclass
class Chooser:
    choose: Callable[[dict], str]          # {"B":..., "S":..., "T":..., "k":...} -> form
    crossover: str                         # readable decision boundary, for the log
    counts: dict = field(default_factory=dict)   # form -> calls, for tests and the log

    def __call__(self, sizes: dict) -> str:
        form = self.choose(sizes)
        self.counts[form] = self.counts.get(form, 0) + 1
        return form


_CHOOSERS: dict[int, Chooser] = {}
_IDS = itertools.count(1)
_LOCK = threading.Lock()


def register(chooser: Chooser) -> int:
    with _LOCK:
        pid = next(_IDS)
        _CHOOSERS[pid] = chooser
    return pid


def chooser(plan_id: int) -> Chooser:
    return _CHOOSERS[plan_id]


# The op, opaque to Inductor (not a triton_op like the forms): the form, and with it the kernels and
# their launch parameters, is known only per call, on sizes that are symbolic at compile time.
#
# It is defined on a torch.library.Library rather than with custom_op, for host time: without CUDA
# graphs it runs once per layer per decode step. A custom_op call takes two Python kernels (its
# autograd kernel, which redispatches, then the body wrapped in an output-aliasing check): ~25-33 us
# of dispatch where the body takes ~2. Here the Autograd kernel runs the body itself when nothing is
# traced and no gradient is wanted (one Python hop); any other call (fake or functional tensors,
# meta, other keys, inputs requiring grad) takes torch's generated autograd kernel, the one
# custom_op registers, so tracing, autograd and the fake kernel behave as a custom_op's.
_LIB = torch.library.Library("mla", "FRAGMENT")
_LIB.define("auto(Tensor q_nope, Tensor q_rope, Tensor latent, Tensor k_rope, Tensor w_uk, Tensor w_uv, "
            "Tensor? topk_indices, Tensor? mask, float scale, bool is_causal, SymInt plan_id, "
            "Tensor? sinks=None) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))


def _auto_body(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
               w_uk: torch.Tensor, w_uv: torch.Tensor, topk_indices: Optional[torch.Tensor],
               mask: Optional[torch.Tensor], scale: float, is_causal: bool, plan_id: int,
               sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, H, S, _ = q_nope.shape
    T = latent.shape[-2]
    k = topk_indices.shape[-1] if topk_indices is not None else None
    form = _CHOOSERS[plan_id]({"B": B, "S": S, "T": T, "k": k})
    fn = implementation_for(form, q_nope)
    if form in SPARSE_FORMS:
        return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal, sinks=sinks)
    if topk_indices is not None and k < T:
        # The cost model found dense attention cheaper even though k < T (tiny T): apply the top-k
        # selection as a dense mask, as HF does; exact, and what the model's dense cost counted.
        mask = mask_outside_topk(mask, topk_indices, S, T)
    return fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, sinks=sinks)


_LIB.impl("auto", _auto_body, "CompositeExplicitAutograd")


@torch.library.register_fake("mla::auto", lib=_LIB)
def _(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal, plan_id, sinks=None):
    B, H, S, _ = q_nope.shape
    return q_nope.new_empty(B, H, S, w_uv.shape[1])


# mla.auto's backward: the form the plan chose for these sizes, differentiated as that form

def _setup_auto(ctx, inputs, output):
    q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal, plan_id = inputs[:11]
    sinks = inputs[11] if len(inputs) > 11 else None
    ctx.save_for_backward(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, sinks)
    ctx.scale, ctx.is_causal, ctx.plan_id, ctx.n_inputs = scale, is_causal, plan_id, len(inputs)


def auto_form(plan_id: int, q_nope, latent, topk_indices) -> str:
    """The form mla.auto ran for these sizes (the plan's choice, evaluated without counting a call)."""
    B, H, S, _ = q_nope.shape
    T = latent.shape[-2]
    k = topk_indices.shape[-1] if topk_indices is not None else None
    return chooser(plan_id).choose({"B": B, "S": S, "T": T, "k": k})


def _backward_auto(ctx, grad):
    q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, sinks = ctx.saved_tensors
    form = auto_form(ctx.plan_id, q_nope, latent, topk_indices)
    if form in SPARSE_FORMS:
        grads = sparse_backward(grad, q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask,
                                ctx.scale, ctx.is_causal, sinks)
    else:
        if topk_indices is not None and topk_indices.shape[-1] < latent.shape[-2]:
            mask = mask_outside_topk(mask, topk_indices, q_nope.shape[2], latent.shape[-2])
        grads = dense_backward(grad, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, ctx.scale, ctx.is_causal,
                               sinks)
    # (topk_indices, mask, scale, is_causal, plan_id) get none; sinks, when given, its own
    grads, d_sinks = grads[:6], grads[6:]
    return grads + (None,) * 5 + ((d_sinks or (None,)) if ctx.n_inputs > 11 else ())


_generated_autograd = make_autograd_impl(torch.ops.mla.auto.default, AutogradInfo(_backward_auto, _setup_auto))

# The keysets of a call on plain CPU or CUDA tensors as the Autograd kernel sees them (compared by
# their raw bits: DispatchKeySet has no hash).
_PLAIN_KEYSETS = frozenset(
    (torch._C.DispatchKeySet(backend) | torch._C.DispatchKeySet(autograd)).raw_repr()
    for backend, autograd in ((torch._C.DispatchKey.CPU, torch._C.DispatchKey.AutogradCPU),
                              (torch._C.DispatchKey.CUDA, torch._C.DispatchKey.AutogradCUDA)))


def _auto_autograd(keyset, *args):
    """mla.auto's Autograd kernel: the body at once for a call on plain tensors that wants no gradient
    (its ops then record nothing), else torch's generated kernel (autograd.Function over a redispatch
    below autograd)."""
    if keyset.raw_repr() in _PLAIN_KEYSETS and not (torch._C.is_grad_enabled()
                                                    and torch._C._any_requires_grad(*args)):
        return _auto_body(*args)
    return _generated_autograd(keyset, *args)


_LIB.impl("auto", _auto_autograd, "Autograd", with_keyset=True)
