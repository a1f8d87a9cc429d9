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

The gathered form (DeepSeek-V4's CSA layers): kv is the W window keys followed by C compressed entries,
of which the indexer picked k per query (`topk_indices` [B, S, k] into the compressed entries, -1 = none,
distinct in each row). HF writes the pick as a dense [B, 1, S, C] bias, 0 at the picked entries and
-inf elsewhere, concatenated after the window's mask; this reads the picked entries alone:

    scores = [q kv[:W]^T * scale + mask,  q kv[W + idx]^T * scale (-inf where idx = -1)]
    out    = softmax(scores [, sink_h]) [kv[:W]; kv[W + idx]]

`mla.latent_mqa_gathered(q, kv, mask, topk_indices, scale, sinks)`: the mask (broadcastable to
[B, 1, S, W]) is required, its last dim is W. On a GPU it runs the DSA kernel
(`kernels.sparse_decode.gathered_window_attention`) over the window positions and the picked ones.
"""

from __future__ import annotations

from typing import Optional

import torch

from mla_compile.kernels.common import FLOAT_DTYPES, Dims, check_mask, check_sinks, check_topk_range
from mla_compile.kernels.registry import kernel_for
from mla_compile.passes.forms.absorbed import masked_scores
from mla_compile.passes.forms.common import as_tokens, compute_dtype, head_sinks, softmax_rows
from mla_compile.passes.forms.sparse import gather_rows


def check_latent_mqa(q, kv, mask, sinks, mask_keys=None) -> tuple[int, int, int, int, int]:
    """(B, H, S, T, D), or an error naming the argument at fault. mask_keys: the keys the mask covers
    (all T by default; the gathered form's mask covers the window alone)."""
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
    check_mask(mask, B, S, T if mask_keys is None else mask_keys)
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
    dq, dkv, dsinks = _reference_grads(grad, latent_mqa_reference, q, kv, sinks, mask, ctx.scale, ctx.is_causal)
    return dq, dkv, None, None, None, dsinks


def _reference_grads(grad, reference, q, kv, sinks, *args):
    """(dq, dkv, dsinks or None): `reference(q, kv, *args, sinks)` recomputed under autograd and
    differentiated against `grad` (the backward of both ops)."""
    leaves = [t.detach().requires_grad_() for t in (q, kv)]
    sink_leaf = sinks.detach().requires_grad_() if sinks is not None else None
    with torch.enable_grad():
        out = reference(*leaves, *args, sink_leaf)
        wrt = leaves + ([sink_leaf] if sink_leaf is not None else [])
        grads = torch.autograd.grad(out, wrt, grad)
    return grads[0], grads[1], (grads[2] if sink_leaf is not None else None)


torch.library.register_autograd("mla::latent_mqa", _backward, setup_context=_setup)


def check_latent_mqa_gathered(q, kv, mask, topk_indices, sinks) -> tuple[int, int, int, int, int, int, int]:
    """(B, H, S, T, D, W, k) of the gathered form, or an error naming the argument at fault."""
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0:
        raise ValueError("mask: the gathered form needs the window's mask, broadcastable to [B, 1, S, W]; "
                         f"its last dim is the window's width W (got {type(mask).__name__})")
    c = as_tokens(kv, "kv") if isinstance(kv, torch.Tensor) else kv
    W = mask.shape[-1]
    if isinstance(c, torch.Tensor) and c.dim() == 3 and W > c.shape[1]:
        raise ValueError(f"mask: covers W={W} window keys, more than kv's T={c.shape[1]}")
    B, H, S, T, D = check_latent_mqa(q, kv, mask, sinks, mask_keys=W)
    if not isinstance(topk_indices, torch.Tensor):
        raise TypeError(f"topk_indices: expected a tensor, got {type(topk_indices).__name__}")
    if topk_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_indices: expected int32 or int64, got {topk_indices.dtype}")
    if topk_indices.dim() != 3 or tuple(topk_indices.shape[:2]) != (B, S):
        raise ValueError(f"topk_indices: expected [B={B}, S={S}, k], got {tuple(topk_indices.shape)}")
    if topk_indices.device != q.device:
        raise ValueError(f"topk_indices: on {topk_indices.device}, the other tensors on {q.device}")
    check_topk_range(topk_indices, T - W)      # into the C = T - W compressed entries; -1 = none
    return B, H, S, T, D, W, topk_indices.shape[2]


# Gathered elements held at once per chunk of query positions (bounds the reference's memory).
_GATHER_BUDGET = 1 << 24


def latent_mqa_gathered_reference(q, kv, mask, topk_indices, scale=1.0, sinks=None):
    """The gathered form's math in float32 (float64 stays float64), chunked over the queries: the
    window's scores densely under its mask, the picked entries' scores gathered, one softmax over both
    (with the sinks), then P times the same rows. The output has kv's dtype."""
    B, H, S, T, D, W, k = check_latent_mqa_gathered(q, kv, mask, topk_indices, sinks)
    ct = compute_dtype(q.dtype)
    c = as_tokens(kv, "kv").to(ct)
    cw, cc = c[:, :W], c[:, W:]
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, 1, S, W)
    sink = head_sinks(sinks)
    out = torch.empty(B, H, S, D, dtype=kv.dtype, device=q.device)
    chunk = max(1, min(S, _GATHER_BUDGET // max(1, B * (k * D + H * (W + k)))))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        s = s1 - s0
        qs = q[:, :, s0:s1].to(ct)                                                        # [B, H, s, D]
        dense = torch.bmm(qs.reshape(B, H * s, D), cw.transpose(1, 2)).view(B, H, s, W)
        dense = masked_scores(dense * scale, m[:, :, s0:s1], False)
        idx = topk_indices[:, s0:s1].long()
        valid = idx >= 0
        g = gather_rows(cc, idx.clamp_min(0)).reshape(B * s, k, D)                        # [B*s, k, D]
        rows = qs.permute(0, 2, 1, 3).reshape(B * s, H, D)
        picked = torch.bmm(rows, g.transpose(1, 2)).view(B, s, H, k).permute(0, 2, 1, 3)  # [B, H, s, k]
        picked = (picked * scale).masked_fill(~valid[:, None], float("-inf"))
        p = softmax_rows(torch.cat([dense, picked], -1), sink).to(ct)
        o = torch.bmm(p[..., :W].reshape(B, H * s, W), cw).view(B, H, s, D)
        pg = p[..., W:].permute(0, 2, 1, 3).reshape(B * s, H, k)
        o = o + torch.bmm(pg, g).view(B, s, H, D).permute(0, 2, 1, 3)
        out[:, :, s0:s1] = o.to(out.dtype)
    return out


def latent_mqa_gathered_kernel(q, kv, mask, topk_indices, scale=1.0, sinks=None):
    """The same through the DSA Triton kernel (window positions and picked entries as one index list)."""
    from mla_compile.kernels.sparse_decode import gathered_window_attention

    check_latent_mqa_gathered(q, kv, mask, topk_indices, sinks)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the kernel takes float16, bfloat16 or float32, got {q.dtype}")
    return gathered_window_attention(q, kv, mask, topk_indices, scale, sinks).to(kv.dtype)


@torch.library.custom_op("mla::latent_mqa_gathered", mutates_args=())
def latent_mqa_gathered(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, topk_indices: torch.Tensor,
                        scale: float, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    run = latent_mqa_gathered_kernel if kernel_for("sparse_absorbed", q) is not None else latent_mqa_gathered_reference
    return run(q, kv, mask, topk_indices, scale, sinks).contiguous()


@latent_mqa_gathered.register_fake
def _(q, kv, mask, topk_indices, scale, sinks=None):
    return q.new_empty(q.shape, dtype=kv.dtype)


def _setup_gathered(ctx, inputs, output):
    q, kv, mask, topk_indices, scale = inputs[:5]
    sinks = inputs[5] if len(inputs) > 5 else None
    ctx.save_for_backward(q, kv, mask, topk_indices, sinks)
    ctx.scale = scale


def _backward_gathered(ctx, grad):
    """The reference's gradient (recomputed under autograd; the gathered rows' gradients scatter-add
    back into kv): q, kv and the sinks get theirs."""
    q, kv, mask, topk_indices, sinks = ctx.saved_tensors
    dq, dkv, dsinks = _reference_grads(grad, latent_mqa_gathered_reference, q, kv, sinks, mask, topk_indices,
                                       ctx.scale)
    return dq, dkv, None, None, None, dsinks


torch.library.register_autograd("mla::latent_mqa_gathered", _backward_gathered, setup_context=_setup_gathered)
