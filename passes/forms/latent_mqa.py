"""Latent multi-query attention: one key/value head shared by every query head, the key and the value
the same tensor. DeepSeek-V4 attends this way over its normalised `kv` (RoPE on a trailing slice),
its sliding window and its compressed entries together:

    scores = q kv^T * scale + mask                q [B, H, S, D], kv [B, 1, T, D] (or [B, T, D])
    out    = softmax(scores [, sink_h]) kv        [B, H, S, D]

It is the absorbed form's attention core with the query given (no W_UK), the latent read as key and
value (no W_UV) and no separate RoPE key. HF repeats kv to every head (`repeat_kv`) and reads each copy;
this reads kv once, the heads and queries folded into the rows of one product against it. On a GPU it
runs the absorbed form's Triton core (`kernels.absorbed_decode.absorbed_latent_attention`, zero-wide
RoPE parts); elsewhere, and on the CPU, the reference below.

`mla.latent_mqa(q, kv, mask, scale, is_causal, sinks) -> [B, H, S, D]` is an opaque custom op
(Inductor calls it as one kernel), differentiable through the reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from mla_compile.kernels.common import FLOAT_DTYPES, Dims, check_mask, check_sinks
from mla_compile.kernels.registry import kernel_for
from mla_compile.passes.forms.absorbed import masked_scores
from mla_compile.passes.forms.common import as_tokens, compute_dtype, head_sinks, softmax_rows


def check_latent_mqa(q, kv, mask, sinks) -> tuple[int, int, int, int, int]:
    """(B, H, S, T, D), or an error naming the argument at fault."""
    for name, t in (("q", q), ("kv", kv)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {t.dtype}")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv: dtype {kv.dtype} differs from q's {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, H, S, D], got {tuple(q.shape)}")
    B, H, S, D = q.shape
    c = as_tokens(kv, "kv")
    if c.shape[0] != B or c.shape[2] != D:
        raise ValueError(f"kv: expected [B={B}, 1, T, D={D}], got {tuple(kv.shape)}")
    T = c.shape[1]
    if T == 0:
        raise ValueError(f"kv: T = 0 cached tokens (shape {tuple(kv.shape)}): attention over no keys is undefined")
    devices = {q.device, kv.device}
    check_mask(mask, B, S, T)
    if mask is not None:
        devices.add(mask.device)
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    check_sinks(sinks, Dims(B, H, S, T, D, 0, D, D, q.device))
    return B, H, S, T, D


def latent_mqa_reference(q, kv, mask=None, scale=1.0, is_causal=False, sinks=None):
    """The math above in float32 (float64 stays float64): scores, HF's mask, the softmax with its
    sinks, then P kv, with the heads and queries as the rows of one batched product. The output has
    kv's dtype, as HF's P @ V has V's."""
    B, H, S, T, D = check_latent_mqa(q, kv, mask, sinks)
    ct = compute_dtype(q.dtype)
    c = as_tokens(kv, "kv").to(ct)                                        # [B, T, D]
    scores = torch.bmm(q.to(ct).reshape(B, H * S, D), c.transpose(1, 2)).view(B, H, S, T)
    p = softmax_rows(masked_scores(scores * scale, mask, is_causal), head_sinks(sinks)).to(ct)
    return torch.bmm(p.reshape(B, H * S, T), c).view(B, H, S, D).to(kv.dtype)


def latent_mqa_kernel(q, kv, mask=None, scale=1.0, is_causal=False, sinks=None):
    """The same through the absorbed form's Triton core: q as the absorbed query, kv as the latent,
    zero-wide RoPE parts."""
    from mla_compile.kernels.absorbed_decode import absorbed_latent_attention

    B, H, S, T, D = check_latent_mqa(q, kv, mask, sinks)
    no_rope_q = q.new_empty(B, H, S, 0)
    no_rope_k = kv.new_empty(B, T, 0)
    out = absorbed_latent_attention(q, no_rope_q, as_tokens(kv, "kv"), no_rope_k, mask, scale, is_causal,
                                    sinks=sinks)
    return out.to(kv.dtype)


@torch.library.custom_op("mla::latent_mqa", mutates_args=())
def latent_mqa(q: torch.Tensor, kv: torch.Tensor, mask: Optional[torch.Tensor], scale: float, is_causal: bool,
               sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    run = latent_mqa_kernel if kernel_for("absorbed", q) is not None else latent_mqa_reference
    return run(q, kv, mask, scale, is_causal, sinks).contiguous()


@latent_mqa.register_fake
def _(q, kv, mask, scale, is_causal, sinks=None):
    return q.new_empty(q.shape, dtype=kv.dtype)


def _setup(ctx, inputs, output):
    q, kv, mask, scale, is_causal = inputs[:5]
    sinks = inputs[5] if len(inputs) > 5 else None
    ctx.save_for_backward(q, kv, mask, sinks)
    ctx.scale, ctx.is_causal = scale, is_causal


def _backward(ctx, grad):
    """The reference's gradient (recomputed under autograd): q, kv and the sinks get theirs."""
    q, kv, mask, sinks = ctx.saved_tensors
    leaves = [t.detach().requires_grad_() for t in (q, kv)]
    sink_leaf = sinks.detach().requires_grad_() if sinks is not None else None
    with torch.enable_grad():
        out = latent_mqa_reference(*leaves, mask, ctx.scale, ctx.is_causal, sink_leaf)
        wrt = leaves + ([sink_leaf] if sink_leaf is not None else [])
        grads = torch.autograd.grad(out, wrt, grad)
    return grads[0], grads[1], None, None, None, (grads[2] if sink_leaf is not None else None)


torch.library.register_autograd("mla::latent_mqa", _backward, setup_context=_setup)
