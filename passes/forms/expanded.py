"""The expanded form: what HF does (right for prefill, where S is close to T).

    K_nope = c W_UK^T, V = c W_UV^T           [B, H, T, dn], [B, H, T, dv]  (one expansion GEMM)
    scores = (q_nope K_nope^T + q_rope kp^T) * scale + mask
    out    = softmax(scores) V                [B, H, S, dv]

The shared RoPE key is multiplied with the query in rows ([B, H*S, dr] x [B, dr, T]) instead of
being broadcast into a [B, H, T, dn+dr] key as HF does with `new_empty` and two `copy_`s.
"""

from __future__ import annotations

import torch

from mla_compile.passes.forms.absorbed import masked_scores
from mla_compile.passes.forms.common import (
    as_tokens, check_args, check_sinks, compute_dtype, head_sinks, softmax_rows,
)


def expand_latent(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """c [B, T, r] x W [H, d, r] -> [B, H, T, d]: one GEMM over all heads (kv_b_proj's own product)."""
    H, dh, r = w.shape
    B, T, _ = c.shape
    out = torch.matmul(c, w.reshape(H * dh, r).t().to(c.dtype))   # [B, T, H*d]
    return out.view(B, T, H, dh).transpose(1, 2)


def expanded_reference(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask=None, scale=1.0, is_causal=False,
                       sinks=None):
    d = check_args(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask)
    check_sinks(sinks, d)
    B, H, S, T = d.batch, d.heads, d.q_len, d.kv_len
    ct = compute_dtype(q_nope.dtype)
    c = as_tokens(latent, "latent").to(ct)
    k_nope = expand_latent(c, w_uk)                       # [B, H, T, dn]
    v = expand_latent(c, w_uv)                            # [B, H, T, dv]
    scores = torch.matmul(q_nope.to(ct), k_nope.transpose(-1, -2))
    if d.rope_dim:
        kp = as_tokens(k_rope, "k_rope").to(ct)
        rope = torch.bmm(q_rope.to(ct).reshape(B, H * S, d.rope_dim), kp.transpose(1, 2))
        scores = scores + rope.view(B, H, S, T)
    scores = masked_scores(scores * scale, mask, is_causal)
    p = softmax_rows(scores, head_sinks(sinks)).to(ct)
    return torch.matmul(p, v).to(q_nope.dtype)
