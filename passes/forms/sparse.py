"""The sparse-gathered forms of DeepSeek Sparse Attention (DSA): attend only to the indexer's top-k.

HF builds a dense [B, 1, S, T] mask by scattering the top-k indices and masks every other key,
so its cost grows with S*T. These forms gather the k selected latent rows per query instead:

    idx    [B, S, k]   int32 positions in [0, T), -1 = "no token"; unique per row, as topk gives them
    c_g    = c[b, idx[b, s, :]]                       [B, S, k, r]   (and kp_g likewise)
    sparse_absorbed: scores = (q_lat c_g^T + q_rope kp_g^T) * scale + mask[b, s, idx]
                     out    = (softmax(scores) c_g) W_UV^T
    sparse_expanded: expand the gathered rows per head (c_g W_UK^T, c_g W_UV^T), then attend.

The user's mask (causal, padding) is read only at the selected positions, so the work is O(S*k),
never O(S*T). Query positions are processed in chunks so the gathered rows stay bounded in memory.
A row whose selected keys are all masked gives zeros (HF would give a uniform average over the
whole masked row; such rows only exist at padding positions).
"""

from __future__ import annotations

import torch

from mla_compile.passes.forms.absorbed import absorb_query, project_output
from mla_compile.passes.forms.common import (
    additive_mask, as_tokens, check_args, check_indices, check_sinks, compute_dtype, softmax_rows,
)

# Gathered latent elements held at once per chunk of query positions (bounds the reference's memory).
GATHER_BUDGET = 1 << 25


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, d], idx [B, S, k] (already clamped to >= 0) -> [B, S, k, d] without expanding x."""
    B, T, dd = x.shape
    flat = idx + torch.arange(B, device=idx.device).view(B, 1, 1) * T
    return x.reshape(B * T, dd).index_select(0, flat.reshape(-1)).view(*idx.shape, dd)


def mask_outside_topk(mask, topk_indices, q_len: int, kv_len: int) -> torch.Tensor:
    """HF's dense DSA mask: `mask` with every key outside the row's top-k selection masked out.
    Bool (True = attend) in, bool out; a float mask gets -inf outside the selection. O(S*T): only for
    the dense forms of a DSA region, where the dense mask is what the cost model counted."""
    B = topk_indices.shape[0]
    idx = topk_indices.long()
    selected = torch.zeros(B, q_len, kv_len + 1, dtype=torch.bool, device=idx.device)
    selected.scatter_(-1, torch.where(idx >= 0, idx, kv_len), True)        # -1 parks in a spare column
    selected = selected[..., :kv_len].unsqueeze(1)                          # [B, 1, S, T]
    if mask is None:
        return selected
    if mask.dtype == torch.bool:
        return mask & selected
    return mask.masked_fill(~selected, float("-inf"))


def selected_bias(mask, idx, valid, s0: int, q_len: int, kv_len: int, is_causal: bool, dtype) -> torch.Tensor:
    """The additive mask at the selected positions only: [B, s, k] for queries s0 .. s0+s."""
    B, s, k = idx.shape
    bias = torch.zeros(B, s, k, dtype=dtype, device=idx.device)
    if mask is not None:
        m = additive_mask(mask, dtype)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m[:, 0].expand(B, q_len, kv_len)[:, s0:s0 + s]   # a view: nothing is copied
        bias = bias + torch.gather(m, 2, idx)
    if is_causal:
        q_pos = torch.arange(s0, s0 + s, device=idx.device).view(1, s, 1)
        bias = bias.masked_fill(idx > q_pos, float("-inf"))
    return bias.masked_fill(~valid, float("-inf"))


def _sparse(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal, absorbed: bool,
            sinks=None):
    d = check_args(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask)
    k = check_indices(topk_indices, d)
    check_sinks(sinks, d)
    sink_col = None if sinks is None else sinks.reshape(1, d.heads, 1)   # the sink of [B*s, H, k] rows
    B, H, S = d.batch, d.heads, d.q_len
    ct = compute_dtype(q_nope.dtype)
    out = q_nope.new_empty(B, H, S, d.v_dim)
    if S == 0 or B == 0:
        return out
    c = as_tokens(latent, "latent").to(ct)
    kp = as_tokens(k_rope, "k_rope").to(ct)
    per_query = max(1, B * k * (d.rank + d.rope_dim + (H * (d.nope_dim + d.v_dim) if not absorbed else 0)))
    chunk = max(1, min(S, GATHER_BUDGET // per_query))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        s = s1 - s0
        idx = topk_indices[:, s0:s1].long()
        valid = idx >= 0
        idx = idx.clamp_min(0)
        c_g = gather_rows(c, idx).reshape(B * s, k, d.rank)
        qn, qr = q_nope[:, :, s0:s1], q_rope[:, :, s0:s1]
        rows = lambda x: x.to(ct).permute(0, 2, 1, 3).reshape(B * s, H, -1)   # noqa: E731  [B*s, H, d]
        if absorbed:
            q_lat = rows(absorb_query(qn, w_uk, ct))
            scores = torch.bmm(q_lat, c_g.transpose(1, 2))                       # [B*s, H, k]
        else:
            k_nope = torch.matmul(c_g, w_uk.reshape(H * d.nope_dim, d.rank).t().to(ct))
            k_nope = k_nope.view(B * s, k, H, d.nope_dim).permute(0, 2, 3, 1)   # [B*s, H, dn, k]
            scores = torch.matmul(rows(qn).unsqueeze(2), k_nope).squeeze(2)     # [B*s, H, k]
        if d.rope_dim:
            kp_g = gather_rows(kp, idx).reshape(B * s, k, d.rope_dim)
            scores = scores + torch.bmm(rows(qr), kp_g.transpose(1, 2))
        bias = selected_bias(mask, idx, valid, s0, d.q_len, d.kv_len, is_causal, scores.dtype).reshape(B * s, 1, k)
        p = softmax_rows(scores * scale + bias, sink_col).to(ct)                  # [B*s, H, k]
        if absorbed:
            o_lat = torch.bmm(p, c_g).view(B, s, H, d.rank).permute(0, 2, 1, 3)
            o = project_output(o_lat, w_uv)
        else:
            v = torch.matmul(c_g, w_uv.reshape(H * d.v_dim, d.rank).t().to(ct))
            v = v.view(B * s, k, H, d.v_dim).permute(0, 2, 1, 3)                 # [B*s, H, k, dv]
            o = torch.matmul(p.unsqueeze(2), v).squeeze(2).view(B, s, H, d.v_dim).permute(0, 2, 1, 3)
        out[:, :, s0:s1] = o.to(out.dtype)
    return out


def sparse_absorbed_reference(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask=None,
                              scale=1.0, is_causal=False, sinks=None):
    return _sparse(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal, True, sinks)


def sparse_expanded_reference(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask=None,
                              scale=1.0, is_causal=False, sinks=None):
    return _sparse(q_nope, q_rope, latent, k_rope, w_uk, w_uv, topk_indices, mask, scale, is_causal, False, sinks)
