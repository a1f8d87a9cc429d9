"""Autograd formulas for the MLA ops (`torch.ops.mla.{expanded,absorbed,sparse_absorbed,sparse_expanded,auto}`).

    import mla_compile.passes.forms.autograd   # side effect: register_autograd on every op (idempotent)

All forms compute one function (see common.py), so the backward is written once per kind, in the
absorbed (latent) parametrisation, in plain torch (traceable by AOTAutograd; Inductor fuses it):

    q_lat = q_nope W_UK                         s = (q_lat c^T + q_rope kp^T) * scale + mask
    P     = softmax(s)                          o_lat = P c          out = o_lat W_UV^T

    d_o_lat = dO W_UV                           dW_UV = sum_{b,s} dO^T o_lat            (per head)
    dP      = d_o_lat c^T                       dS    = P * (dP - rowsum(dP * P)) * scale
    dq_lat  = dS c                              dq_nope = dq_lat W_UK^T     dW_UK = sum_{b,s} q_nope^T dq_lat
    dq_rope = dS kp                             dkp     = sum_h dS^T q_rope
    dc      = sum_h (P^T d_o_lat + dS^T q_lat)

The sparse forms gather the selected rows (c_g = c[idx], kp_g = kp[idx]), apply the same formulas
over the k selected keys, and scatter-add (index_add_) the row gradients back into dc and dkp, so
duplicated indices accumulate as the forward counts them. Invalid (-1) selections carry P = 0 and so
no gradient. Nothing is saved but the inputs; P is recomputed in the backward (flash-style), which
keeps the forward's memory what it was. Gradients flow to q_nope, q_rope, latent, k_rope, w_uk and
w_uv (views of kv_b_proj.weight, so autograd carries them to the parameter); mask, indices, scale
and is_causal get none. Half-precision inputs are differentiated in float32 and cast back.

The backward needs no backward kernel: every form (and `mla.auto`, which re-evaluates its plan's
choice on the same sizes) has one, so the backend never has to avoid a form in training.
"""

from __future__ import annotations

import torch

from mla_compile.passes.forms.absorbed import masked_scores
from mla_compile.passes.forms.common import compute_dtype, head_sinks, softmax_rows
from mla_compile.passes.forms.sparse import GATHER_BUDGET, gather_rows, mask_outside_topk, selected_bias

_DENSE_ARGS = ("q_nope", "q_rope", "latent", "k_rope", "w_uk", "w_uv", "mask")
_REGISTERED = False


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[-2], x.shape[-1])        # [B, 1, T, d] or [B, T, d] -> [B, T, d]


def _per_head_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, d] -> [H, B*S, d]."""
    B, H, S, d = x.shape
    return x.permute(1, 0, 2, 3).reshape(H, B * S, d)


def _from_head_rows(x: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """[H, B*S, d] -> [B, H, S, d]."""
    H, _, d = x.shape
    return x.reshape(H, B, S, d).permute(1, 0, 2, 3)


def dense_backward(grad_out, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, sinks=None):
    """Gradients of the dense MLA function w.r.t. (q_nope, q_rope, latent, k_rope, w_uk, w_uv), and
    w.r.t. the sinks when there are any (a seventh gradient, [H]): a sink is a key with a zero value,
    so dP_sink = 0 and dS_sink = -P_sink rowsum(dP * P), summed over batch and queries per head."""
    B, H, S, dn = q_nope.shape
    ct = compute_dtype(q_nope.dtype)
    c = _tokens(latent).to(ct)                                   # [B, T, r]
    kp = _tokens(k_rope).to(ct)                                  # [B, T, dr]
    T, r, dr = c.shape[1], c.shape[2], kp.shape[2]
    wk, wv = w_uk.to(ct), w_uv.to(ct)
    qn, qr, dO = q_nope.to(ct), q_rope.to(ct), grad_out.to(ct)

    q_lat = _from_head_rows(torch.bmm(_per_head_rows(qn), wk), B, S)          # [B, H, S, r]
    scores = torch.matmul(q_lat.reshape(B, H * S, r), c.transpose(1, 2))
    scores = scores + torch.matmul(qr.reshape(B, H * S, dr), kp.transpose(1, 2))
    scores = masked_scores(scores.view(B, H, S, T) * scale, mask, is_causal)
    p = softmax_rows(scores, head_sinks(sinks)).to(ct)                         # [B, H, S, T]
    p_rows = p.reshape(B, H * S, T)
    o_lat = torch.bmm(p_rows, c).view(B, H, S, r)

    d_o_lat = _from_head_rows(torch.bmm(_per_head_rows(dO), wv), B, S)        # [B, H, S, r]
    d_wv = torch.bmm(_per_head_rows(dO).transpose(1, 2), _per_head_rows(o_lat))   # [H, dv, r]
    dp = torch.bmm(d_o_lat.reshape(B, H * S, r), c.transpose(1, 2)).view(B, H, S, T)
    row_dot = (dp * p).sum(-1, keepdim=True)
    ds = p * (dp - row_dot) * scale
    ds_rows = ds.reshape(B, H * S, T)

    dq_lat = torch.bmm(ds_rows, c).view(B, H, S, r)
    d_c = torch.bmm(p_rows.transpose(1, 2), d_o_lat.reshape(B, H * S, r)) \
        + torch.bmm(ds_rows.transpose(1, 2), q_lat.reshape(B, H * S, r))           # [B, T, r]
    d_qr = torch.bmm(ds_rows, kp).view(B, H, S, dr)
    d_kp = torch.bmm(ds_rows.transpose(1, 2), qr.reshape(B, H * S, dr))            # [B, T, dr]
    d_qn = _from_head_rows(torch.bmm(_per_head_rows(dq_lat), wk.transpose(1, 2)), B, S)
    d_wk = torch.bmm(_per_head_rows(qn).transpose(1, 2), _per_head_rows(dq_lat))  # [H, dn, r]
    grads = (d_qn.to(q_nope.dtype), d_qr.to(q_rope.dtype), d_c.reshape(latent.shape).to(latent.dtype),
             d_kp.reshape(k_rope.shape).to(k_rope.dtype), d_wk.to(w_uk.dtype), d_wv.to(w_uv.dtype))
    if sinks is None:
        return grads
    p_sink = 1 - p.sum(-1, keepdim=True)                                       # [B, H, S, 1]
    d_sinks = -(p_sink * row_dot).sum((0, 2, 3))
    return grads + (d_sinks.to(sinks.dtype),)


def sparse_backward(grad_out, q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal,
                    sinks=None):
    """Gradients of the sparse (top-k gathered) MLA function; the row gradients are scatter-added.
    With sinks, a seventh gradient [H], as in `dense_backward`."""
    B, H, S, dn = q_nope.shape
    ct = compute_dtype(q_nope.dtype)
    c = _tokens(latent).to(ct)
    kp = _tokens(k_rope).to(ct)
    T, r, dr = c.shape[1], c.shape[2], kp.shape[2]
    k = topk_indices.shape[-1]
    wk, wv = w_uk.to(ct), w_uv.to(ct)
    d_c = torch.zeros(B * T, r, dtype=ct, device=c.device)
    d_kp = torch.zeros(B * T, dr, dtype=ct, device=c.device)
    d_qn, d_qr, d_wk, d_wv = [], [], torch.zeros_like(wk), torch.zeros_like(wv)
    sink_col = None if sinks is None else sinks.reshape(1, H, 1)          # the sink of [B*s, H, k] rows
    d_sinks = None if sinks is None else torch.zeros(H, dtype=ct, device=c.device)
    # Chunk the query positions like the forward does, when S is a plain number (a symbolic S under
    # dynamic-shape tracing runs as one chunk, with no guard on its value).
    if isinstance(S, int):
        per_query = max(1, B * k * (r + dr + H))
        chunk = max(1, min(S, GATHER_BUDGET // per_query)) if S else 1
        bounds = [(s0, min(S, s0 + chunk)) for s0 in range(0, S, chunk)]
    else:
        bounds = [(0, S)]
    offsets = (torch.arange(B, device=c.device) * T).view(B, 1, 1)
    for s0, s1 in bounds:
        s = s1 - s0
        idx = topk_indices[:, s0:s1].long()
        valid = idx >= 0
        idx = idx.clamp_min(0)
        c_g = gather_rows(c, idx).reshape(B * s, k, r)
        kp_g = gather_rows(kp, idx).reshape(B * s, k, dr)
        rows = lambda x: x.permute(0, 2, 1, 3).reshape(B * s, H, x.shape[-1])   # noqa: E731  [B*s, H, d]
        qn = q_nope[:, :, s0:s1].to(ct)
        qr = q_rope[:, :, s0:s1].to(ct)
        dO = grad_out[:, :, s0:s1].to(ct)
        q_lat = _from_head_rows(torch.bmm(_per_head_rows(qn), wk), B, s)        # [B, H, s, r]
        q_lat_r, qr_r = rows(q_lat), rows(qr)                                    # [B*s, H, .]
        scores = torch.bmm(q_lat_r, c_g.transpose(1, 2)) + torch.bmm(qr_r, kp_g.transpose(1, 2))
        bias = selected_bias(mask, idx, valid, s0, S, T, is_causal, ct).reshape(B * s, 1, k)
        p = softmax_rows(scores * scale + bias, sink_col).to(ct)                  # [B*s, H, k]
        o_lat = torch.bmm(p, c_g)                                                 # [B*s, H, r]
        d_o_lat_bhs = _from_head_rows(torch.bmm(_per_head_rows(dO), wv), B, s)  # [B, H, s, r]
        o_lat_bhs = o_lat.view(B, s, H, r).permute(0, 2, 1, 3)
        d_wv = d_wv + torch.bmm(_per_head_rows(dO).transpose(1, 2), _per_head_rows(o_lat_bhs))
        d_o_lat = rows(d_o_lat_bhs)
        dp = torch.bmm(d_o_lat, c_g.transpose(1, 2))                              # [B*s, H, k]
        row_dot = (dp * p).sum(-1, keepdim=True)
        ds = p * (dp - row_dot) * scale
        if sinks is not None:
            d_sinks = d_sinks - ((1 - p.sum(-1, keepdim=True)) * row_dot).sum((0, 2))
        dq_lat = torch.bmm(ds, c_g)                                               # [B*s, H, r]
        d_cg = torch.bmm(p.transpose(1, 2), d_o_lat) + torch.bmm(ds.transpose(1, 2), q_lat_r)   # [B*s, k, r]
        d_kpg = torch.bmm(ds.transpose(1, 2), qr_r)                               # [B*s, k, dr]
        live = valid.reshape(B * s, k, 1).to(ct)
        flat = (idx + offsets).reshape(-1)
        d_c = d_c.index_add(0, flat, (d_cg * live).reshape(B * s * k, r))
        d_kp = d_kp.index_add(0, flat, (d_kpg * live).reshape(B * s * k, dr))
        dq_lat_bhs = dq_lat.view(B, s, H, r).permute(0, 2, 1, 3)
        d_qr.append(torch.bmm(ds, kp_g).view(B, s, H, dr).permute(0, 2, 1, 3))
        d_qn.append(_from_head_rows(torch.bmm(_per_head_rows(dq_lat_bhs), wk.transpose(1, 2)), B, s))
        d_wk = d_wk + torch.bmm(_per_head_rows(qn).transpose(1, 2), _per_head_rows(dq_lat_bhs))
    d_qn = torch.cat(d_qn, dim=2) if len(d_qn) > 1 else d_qn[0]
    d_qr = torch.cat(d_qr, dim=2) if len(d_qr) > 1 else d_qr[0]
    grads = (d_qn.to(q_nope.dtype), d_qr.to(q_rope.dtype), d_c.reshape(latent.shape).to(latent.dtype),
             d_kp.reshape(k_rope.shape).to(k_rope.dtype), d_wk.to(w_uk.dtype), d_wv.to(w_uv.dtype))
    return grads if sinks is None else grads + (d_sinks.to(sinks.dtype),)


# --------------------------------------------------------------------------------------------- #
# registration
# --------------------------------------------------------------------------------------------- #
def with_kv_lens(mask, kv_lens, T: int):
    """Fold the dense ops' optional kv_lens (keys at or past it are not read) into the mask."""
    if kv_lens is None:
        return mask
    lens = kv_lens.reshape(-1, 1, 1, 1) if kv_lens.dim() else kv_lens
    keep = torch.arange(T, device=kv_lens.device).view(1, 1, 1, T) < lens        # [B or 1, 1, 1, T]
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def _setup_dense(ctx, inputs, output):
    q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal = inputs[:9]
    kv_lens = inputs[9] if len(inputs) > 9 else None
    sinks = inputs[10] if len(inputs) > 10 else None
    ctx.save_for_backward(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, kv_lens, sinks)
    ctx.scale, ctx.is_causal, ctx.n_inputs = scale, is_causal, len(inputs)


def _backward_dense(ctx, grad):
    q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, kv_lens, sinks = ctx.saved_tensors
    mask = with_kv_lens(mask, kv_lens, latent.shape[-2])
    grads = dense_backward(grad, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, ctx.scale, ctx.is_causal,
                           sinks)
    # (mask, scale, is_causal, kv_lens) get none; sinks, the eleventh input, its own when given
    grads, d_sinks = grads[:6], (grads[6:] or (None,))
    rest = (None,) * (ctx.n_inputs - 6)
    if ctx.n_inputs > 10:
        rest = rest[:4] + d_sinks + rest[5:]
    return grads + rest


def _setup_sparse(ctx, inputs, output):
    q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal = inputs[:10]
    sinks = inputs[10] if len(inputs) > 10 else None
    ctx.save_for_backward(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, sinks)
    ctx.scale, ctx.is_causal, ctx.n_inputs = scale, is_causal, len(inputs)


def _backward_sparse(ctx, grad):
    q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, sinks = ctx.saved_tensors
    grads = sparse_backward(grad, q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask,
                            ctx.scale, ctx.is_causal, sinks)
    # (topk_indices, mask, scale, is_causal) get none; sinks, the eleventh input, its own when given
    return grads[:6] + (None,) * 4 + ((grads[6:] or (None,)) if ctx.n_inputs > 10 else ())


def register() -> None:
    """Register the backward of the four forms (idempotent). mla.auto's is registered by
    passes/dispatch.py, which defines that op, from `dense_backward` and `sparse_backward`."""
    global _REGISTERED
    if _REGISTERED:
        return
    import mla_compile.passes.forms.ops  # noqa: F401  (defines the four forms: ops imports nothing of this module)

    for form in ("expanded", "absorbed"):
        torch.library.register_autograd(f"mla::{form}", _backward_dense, setup_context=_setup_dense)
    for form in ("sparse_absorbed", "sparse_expanded"):
        torch.library.register_autograd(f"mla::{form}", _backward_sparse, setup_context=_setup_sparse)
    _REGISTERED = True


register()
