"""Attention whose key and value are one shared head, the same tensor (DeepSeek-V4): latent MQA.

HF writes it as plain attention over the head repeated to every query head (`repeat_kv`):

    rep(x)  = x[:, :, None, :, :].expand(B, 1, H, T, D).reshape(B, H, T, D)    (or x.expand(B, H, T, D))
    K, V    = rep(kv), rep(kv)                                                kv: [B, 1, T, D]
    out     = softmax(Q K^T * scale + mask [, sinks]) V                       Q: [B, H, S, D]

and that is, exactly, `mla.latent_mqa(Q, kv, mask, scale, is_causal, sinks)` (passes/forms/latent_mqa.py).
Proven here: K and V are repeats of one node over the heads, that node is one [B, 1, T, D] head, Q is
[B, H, S, D] with the same D, the mask has no per-head dimension, and the repeats are read by the
attention core alone. What produced kv (the cache, the window, compressed entries) does not matter to
exactness: it is read as it is.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from mla_compile.passes.match import (NoMatch, Region, _Core, _is_fn, _is_method, _only_users, _same, _self, _shape,
                                      _static, _val, module_of)


def _repeat_source(x: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """x = rep(kv) as above: (kv, the repeat's nodes), else None."""
    nodes = []
    if _is_method(x, "reshape", "view"):
        nodes.append(x)
        x = _self(x)
        if not _is_method(x, "expand"):
            return None
        nodes.append(x)
        x = _self(x)
        if not (_is_fn(x, operator.getitem) and isinstance(x.args[1], tuple) and x.args[1][2:3] == (None,)
                and all(s == slice(None) for s in x.args[1][:2] + x.args[1][3:])):
            return None
        nodes.append(x)
        return x.args[0], nodes
    if _is_method(x, "expand"):
        return _self(x), [x]
    return None


def shares_one_head(core: _Core) -> bool:
    """K and V are repeats of one node (the structure alone; `match_shared_kv` proves the rest)."""
    k, v = _repeat_source(core.k), _repeat_source(core.v)
    return k is not None and v is not None and k[0] is v[0]


def match_shared_kv(core: _Core) -> Region:
    """The latent-MQA region of a core whose K and V repeat one head; NoMatch names the failed step."""
    kv, k_nodes = _repeat_source(core.k)
    _, v_nodes = _repeat_source(core.v)
    B, one, T, D = _shape(kv, "the shared key/value head", 4)
    if not _same(one, 1):
        raise NoMatch(f"the shared key/value has {one} heads, not one")
    qb, H, S, qd = _shape(core.q, "Q", 4)
    if not (_same(qb, B) and _same(qd, D)):
        raise NoMatch(f"Q is {_shape(core.q, 'Q')}, expected [B, H, S, D={D}] over the shared head")
    for rep, what in ((core.k, "K"), (core.v, "V")):
        rb, rh, rt, rd = _shape(rep, what, 4)
        if not (_same(rb, B) and _same(rh, H) and _same(rt, T) and _same(rd, D)):
            raise NoMatch(f"{what} is {[rb, rh, rt, rd]}, not the shared head repeated to [B, H={H}, T, D]")
    out = _val(core.output)
    if out is None or out.dim() != 4 or not all(_same(a, b) for a, b in zip(out.shape, (B, H, S, D))):
        raise NoMatch(f"the attention's output is {list(out.shape) if out is not None else '?'}, not [B, H, S, D]")
    if core.mask is not None:
        mv = _val(core.mask)
        if mv is None or mv.dim() > 4 or (mv.dim() >= 3 and not _same(mv.shape[-3], 1)):
            raise NoMatch("the mask has a per-head dimension or more than four (the shared head's kernel reads "
                          "one mask row a query)")
        if mv.requires_grad:
            raise NoMatch("the mask requires a gradient (a learned bias), which the op does not give")
    for n in k_nodes + v_nodes:
        _only_users(n, set(core.nodes) | set(k_nodes) | set(v_nodes), f"the repeated key/value {n.name}")
    _unwritten_until_output(core, kv, k_nodes + v_nodes)
    scale = core.scale if core.scale is not None else float(_static(D, "the head width")) ** -0.5  # SDPA's default
    module, family = module_of(core.output)
    return Region(
        module=module, family=family, core=core.kind, output=core.output, query=core.q, q_nope=None, q_rope=None,
        latent=kv, k_rope=None, weight=None, mask=core.mask, base_mask=None, topk_indices=None, topk=None,
        cache_position=None, scale=float(scale), is_causal=core.is_causal,
        dims=dict(B=B, H=H, S=S, T=T, r=D, dr=0, dn=D, dv=D, k=None), dtype=out.dtype if out is not None else None,
        dead=[n for n in core.nodes + k_nodes + v_nodes if isinstance(n, fx.Node)], sinks=core.sinks, shared_kv=True,
    )


def _unwritten_until_output(core: _Core, kv: fx.Node, repeats: list[fx.Node]) -> None:
    """The op runs where the core's output was: each tensor it reads (Q, kv, the mask, the sinks)
    must hold, there, what the core's first read of it saw. HF's repeat of one head is a view, so a
    write to kv between the scores and P @ V would reach V but not the scores."""
    from mla_compile.passes.contraction import _position, _root, _unwritten

    pos = _position(core.output.graph)
    inside = set(core.nodes) | set(repeats)
    for node in (core.q, kv, core.mask, core.sinks):
        if not isinstance(node, fx.Node):
            continue
        first_read = min((pos[u] for u in node.users if u in inside), default=pos[core.output])
        if not _unwritten(_root(node), first_read, pos[core.output], pos):
            raise NoMatch(f"{node.name} is written in place between its reads and the attention's output")
