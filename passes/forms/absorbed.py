"""The absorbed form: attend over the latent itself (right for decode and short appends).

    q_lat  = q_nope W_UK                      [B, H, S, r]     (W_UK folded into the query)
    scores = (q_lat c^T + q_rope kp^T) * scale + mask
    o_lat  = softmax(scores) c                [B, H, S, r]
    out    = o_lat W_UV^T                     [B, H, S, dv]    (W_UV folded into the output)

It is multi-query attention with one shared (r + dr)-wide key and r-wide value per token, so the
heads (and query positions) are folded into the rows of one matrix product against the latent:
[B, H*S, r] x [B, r, T]. A broadcasting matmul of [B, 1, T, r] against [B, H, ...] would
materialise the latent H times; this never does.
"""

from __future__ import annotations

import torch

from mla_compile.passes.forms.common import (
    additive_mask, as_tokens, causal_mask, check_args, check_sinks, compute_dtype, head_sinks, softmax_rows,
)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """q_nope [B, H, S, dn] x W_UK [H, dn, r] -> [B, H, S, r], one batched product over heads."""
    B, H, S, dn = q_nope.shape
    q = q_nope.to(ct).permute(1, 0, 2, 3).reshape(H, B * S, dn)
    return torch.bmm(q, w_uk.to(ct)).view(H, B, S, w_uk.shape[2]).permute(1, 0, 2, 3)


def project_output(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """o_lat [B, H, S, r] x W_UV^T [H, r, dv] -> [B, H, S, dv]."""
    B, H, S, r = o_lat.shape
    o = o_lat.permute(1, 0, 2, 3).reshape(H, B * S, r)
    return torch.bmm(o, w_uv.to(o.dtype).transpose(1, 2)).view(H, B, S, w_uv.shape[1]).permute(1, 0, 2, 3)


def masked_scores(scores: torch.Tensor, mask, is_causal: bool) -> torch.Tensor:
    """scores [B, H, S, T] with HF's mask added (float) or applied (bool), or SDPA's causal rule."""
    S, T = scores.shape[-2:]
    if is_causal:
        scores = scores.masked_fill(~causal_mask(S, T, scores.device), float("-inf"))
    add = additive_mask(mask, scores.dtype)
    return scores if add is None else scores + add


def absorbed_reference(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask=None, scale=1.0, is_causal=False,
                       sinks=None):
    d = check_args(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask)
    check_sinks(sinks, d)
    B, H, S, T = d.batch, d.heads, d.q_len, d.kv_len
    ct = compute_dtype(q_nope.dtype)
    c = as_tokens(latent, "latent").to(ct)                    # [B, T, r]
    q_lat = absorb_query(q_nope, w_uk, ct).reshape(B, H * S, d.rank)
    scores = torch.bmm(q_lat, c.transpose(1, 2))              # heads x queries in the rows
    if d.rope_dim:
        kp = as_tokens(k_rope, "k_rope").to(ct)
        scores = scores + torch.bmm(q_rope.to(ct).reshape(B, H * S, d.rope_dim), kp.transpose(1, 2))
    scores = masked_scores(scores.view(B, H, S, T) * scale, mask, is_causal)
    p = softmax_rows(scores, head_sinks(sinks)).to(ct)
    o_lat = torch.bmm(p.reshape(B, H * S, T), c).view(B, H, S, d.rank)
    # contiguous, as the fake function promises (Inductor plans its reads from the fake strides)
    return project_output(o_lat, w_uv).to(q_nope.dtype).contiguous()
