"""An independent float64 reference for MLA attention, written the way HF computes it:
expand every cached token, build the dense key, mask the non-selected keys (DSA) densely, softmax."""

from __future__ import annotations

import torch


def naive_mla(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask=None, scale=1.0, is_causal=False, topk_indices=None):
    q_nope, q_rope, latent, k_rope, w_uk, w_uv = (t.double() for t in (q_nope, q_rope, latent, k_rope, w_uk, w_uv))
    B, H, S, dn = q_nope.shape
    T = latent.shape[-2]
    c = latent.reshape(B, T, latent.shape[-1])
    kp = k_rope.reshape(B, T, k_rope.shape[-1])
    k_nope = torch.einsum("btr,hdr->bhtd", c, w_uk)
    v = torch.einsum("btr,hdr->bhtd", c, w_uv)
    key = torch.cat([k_nope, kp[:, None].expand(B, H, T, kp.shape[-1])], dim=-1)
    query = torch.cat([q_nope, q_rope], dim=-1)
    scores = query @ key.transpose(-1, -2) * scale
    allowed = torch.ones(B, 1, S, T, dtype=torch.bool)
    if is_causal:
        allowed = allowed & torch.ones(S, T, dtype=torch.bool).tril()
    if topk_indices is not None:
        sel = torch.zeros(B, S, T + 1, dtype=torch.bool)
        idx = topk_indices.long().clone()
        idx[idx < 0] = T                     # -1 selects nothing: park it in a spare column
        sel.scatter_(-1, idx, True)
        allowed = allowed & sel[..., :T].unsqueeze(1)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)      # a row with nothing allowed gives zeros
    return p @ v


def random_inputs(B, H, S, T, r, dr, dn, dv, dtype=torch.float32, mask="none", topk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    w = rnd(H, dn + dv, r) * r ** -0.5
    args = dict(q_nope=rnd(B, H, S, dn), q_rope=rnd(B, H, S, dr), latent=rnd(B, 1, T, r), k_rope=rnd(B, 1, T, dr),
                w_uk=w[:, :dn], w_uv=w[:, dn:])
    if mask == "float":
        args["mask"] = (torch.randn(B, 1, S, T, generator=g) * 2).to(dtype)
    elif mask == "bool":
        m = torch.rand(B, 1, S, T, generator=g) > 0.3
        m[..., 0] = True                                 # keep every row alive
        args["mask"] = m
    else:
        args["mask"] = None
    if topk is not None:
        idx = torch.stack([torch.randperm(T, generator=g)[:topk] for _ in range(B * S)]).view(B, S, topk)
        args["topk_indices"] = idx.to(torch.int32)
    return args
