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

DeepSeek-V4's CSA layers append compressed entries to the window's keys and let each query see only the
entries its indexer picked. HF writes that pick as a dense bias over every compressed entry:

    J     = where(top >= thr, full_like(top, -1), top)        top = topk(scores over the C entries).indices
    I     = where(J >= 0, J, full_like(J, C))                  -1 (none) parks in a spare column C
    F     = new_full([B, 1, S, C + 1], -inf);  F.scatter_(-1, I.unsqueeze(1), 0)
    mask  = cat([window_mask, F[..., :C].to(dtype)], -1)       [B, 1, S, W + C], kv = [window; compressed]

so mask[b, s, W + j] = 0 where j is among row (b, s)'s picks J >= 0, and -inf elsewhere. `csa_selection`
proves each step (the fill is -inf, the one write is zeros scattered along the key axis at I over every
row, the slice drops exactly the spare column, the sentinels are -1 and C, J is a topk's indices over the
C entries, so distinct and in [-1, C)) and the region carries the window mask and J: the gathered form
`mla.latent_mqa_gathered(q, kv, window_mask, J, scale, sinks)` reads the picked entries alone. Where a
step fails the region stays dense under HF's mask, with the step in the log.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from mla_compile.passes.match import (NoMatch, Region, _arg, _Core, _is_fn, _is_method, _only_users, _same, _self,
                                      _shape, _static, _val, module_of)


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
    window, picks, k, W, mask_nodes, note, limit = None, None, None, None, [], None, None
    try:
        sel = csa_selection(core, T)
    except NoMatch as e:
        sel, note = None, f"CSA's top-k bias not gathered ({e}): dense over HF's mask"
    except Exception as e:  # noqa: BLE001 - a shape the prover did not foresee: dense, as written
        sel, note = None, f"CSA's top-k bias not gathered (the proof stopped on {type(e).__name__}: {e}): dense"
    if sel is not None:
        window, picks, k, W, mask_nodes, limit = sel
    dims = dict(B=B, H=H, S=S, T=T, r=D, dr=0, dn=D, dv=D, k=k)
    if picks is not None:
        dims["W"] = W
    return Region(
        module=module, family=family, core=core.kind, output=core.output, query=core.q, q_nope=None, q_rope=None,
        latent=kv, k_rope=None, weight=None, mask=core.mask, base_mask=window, topk_indices=picks, topk=k,
        cache_position=None, scale=float(scale), is_causal=core.is_causal,
        dims=dims, dtype=out.dtype if out is not None else None,
        dead=[n for n in core.nodes + k_nodes + v_nodes + mask_nodes if isinstance(n, fx.Node)], sinks=core.sinks,
        shared_kv=True, note=note, layout=None if limit is None else {"picks_below": limit},
    )


def _size(v: Any) -> Any:
    """A size argument as a value: an int, or the SymInt a graph node holds."""
    return v.meta.get("example_value", v.meta.get("val")) if isinstance(v, fx.Node) else v


def _float_casts(x: Any, chain: list[fx.Node]) -> Any:
    """Back through float-to-float casts (`.to(dtype)`, `.float()`...), which keep 0 and -inf exact."""
    while _is_method(x, "to", "type", "float", "half", "bfloat16", "double"):
        v, src = _val(x), _val(_self(x))
        if v is None or src is None or not (v.is_floating_point() and src.is_floating_point()):
            break
        chain.append(x)
        x = _self(x)
    return x


def _topk_over(J: Any, C: Any) -> bool:
    """J's values lie in [-1, C') and the ones >= 0 are distinct in each row: J is a topk's indices along
    the last axis of a tensor whose last dim is C', possibly with some replaced by the constant -1 (HF's
    `where(invalid, full_like(top, -1), top)`); else NoMatch. Returns whether C' is provably C (Dynamo
    may give the indexer's entry count and the compressor's two symbols)."""
    from mla_compile.passes.contraction import _distinct, _fill_value

    top = J
    if _is_fn(J, torch.where) and len(J.args) == 3:
        cond, a, b = J.args
        if not (_fill_value(a) is not None and _fill_value(a)[0] == -1 and isinstance(b, fx.Node)):
            raise NoMatch("the picks are a where() that does not replace entries by the constant -1")
        top = b
    if not (_is_fn(top, operator.getitem) and top.args[1] == 1
            and (_is_method(top.args[0], "topk") or _is_fn(top.args[0], torch.topk))):
        raise NoMatch("the picks are not a topk's indices (nor those with some set to -1)")
    t = top.args[0]
    dim = t.args[2] if len(t.args) > 2 else t.kwargs.get("dim", -1)
    src = _val(t.args[0])
    if src is None or not isinstance(dim, int) or dim % src.dim() != src.dim() - 1:
        raise NoMatch("the picks' topk does not run along the last axis")
    if not _distinct(top, 2):
        raise NoMatch("the picks are not provably distinct in each row")
    return _same(src.shape[-1], C)


def csa_selection(core: _Core, T: Any):
    """(window mask, picks J [B, S, k], k, W, the dense bias's nodes) where the core's mask is HF's CSA
    mask (module docstring), None where the mask is not a concatenation along the keys at all (a
    sliding or HCA layer), NoMatch naming the step that fails where it is one."""
    from mla_compile.passes.contraction import _fill_value, _is_scatter, _position_of

    M = core.mask
    if not (_is_fn(M, torch.cat) and isinstance(M.args[0], (list, tuple)) and len(M.args[0]) == 2):
        return None
    dim = _arg(M, 0, "dim", 0)
    rank = len(_shape(M, "the mask"))
    if rank != 4 or not isinstance(dim, int) or dim % rank != 3:
        return None
    window, X = M.args[0]
    chain: list[fx.Node] = [M]
    X = _float_casts(X, chain)
    # CSA's bias is a slice of a constant fill that a scatter writes; anything else (HCA's causal bias,
    # a padded window) is no top-k selection
    if not (_is_fn(X, operator.getitem) and isinstance(X.args[1], tuple) and isinstance(X.args[0], fx.Node)
            and _fill_value(X.args[0]) is not None and any(_is_scatter(u) for u in X.args[0].users)):
        return None
    tup = X.args[1]
    last = tup[-1]
    lead = tup[:-1]
    if not (isinstance(last, slice) and last.start in (None, 0) and last.step in (None, 1)
            and (lead == (Ellipsis,) or (len(lead) == 3 and all(e == slice(None) for e in lead)))):
        raise NoMatch("the bias is not sliced to its leading key columns")
    fill = X.args[0]
    chain.append(X)
    fv = _fill_value(fill)
    if fv is None:
        raise NoMatch("the sliced bias is not a constant fill")
    v, dt = fv
    if dt is None or not dt.is_floating_point or not (v == float("-inf") or v == torch.finfo(dt).min):
        raise NoMatch(f"the bias's fill value is {v!r}, not -inf: entries outside the picks are not dropped")
    writes = [u for u in fill.users if u is not X]
    if len(writes) != 1 or not _is_method(writes[0], "scatter_") or writes[0].users or writes[0].args[0] is not fill:
        raise NoMatch(f"the bias {fill.name} is written by {', '.join(u.name for u in writes) or 'nothing'}, "
                      "not one scatter_ of zeros")
    write = writes[0]
    if not _position_of(write) < _position_of(X):
        raise NoMatch("the bias is read before the picks are written")
    if write.kwargs.get("reduce") is not None:
        raise NoMatch("the picks are scattered with a reduction")
    sdim, I4 = _arg(write, 0, "dim"), _arg(write, 1, "index")
    value = _arg(write, 2, "value", _arg(write, 2, "src"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0:
        raise NoMatch(f"the picks get {value!r}, not the constant 0")
    chain += [write, fill]
    fshape = _shape(fill, "the bias", 4)
    if not isinstance(sdim, int) or sdim % 4 != 3:
        raise NoMatch("the picks are scattered along another axis than the keys")
    xshape = _shape(X, "the sliced bias", 4)
    wshape = _shape(window, "the window's mask", 4)
    C = xshape[3]
    W = wshape[3]
    if not _same(W + C, T):
        raise NoMatch(f"the window's mask ({W}) and the bias ({C}) do not cover the T={T} keys")
    if not _same(fshape[3], C + 1):
        raise NoMatch(f"the bias has {fshape[3]} columns, not the C={C} entries and one spare")
    if not (_is_method(I4, "unsqueeze") or _is_fn(I4, torch.unsqueeze)) or _arg(I4, 0, "dim") != 1:
        raise NoMatch("the scattered indices are not the picks with a head axis added")
    I = _self(I4)
    ishape = _shape(I, "the picks", 3)
    if not (_same(ishape[0], fshape[0]) and _same(ishape[1], fshape[2]) and _same(fshape[1], 1)):
        raise NoMatch(f"the picks {list(ishape)} do not cover every row of the bias {list(fshape)}")
    chain += [I4]
    # I = where(J >= 0, J, full_like(J, C)): every -1 (none) parks in the spare column
    if not (_is_fn(I, torch.where) and len(I.args) == 3):
        raise NoMatch("the scattered picks are not where(J >= 0, J, C)")
    valid, J, spare = I.args
    sv = _fill_value(spare)
    spare_value = sv[0] if sv is not None else None
    if sv is None or not _same(_size(sv[0]), C):
        raise NoMatch("the entries set aside do not go to the spare column C")
    if not ((_is_fn(valid, operator.ge, torch.ge) and valid.args[0] is J and valid.args[1] == 0)
            or (_is_fn(valid, operator.gt, torch.gt) and valid.args[0] is J and valid.args[1] == -1)):
        raise NoMatch("the picks kept are not those >= 0")
    chain += [I, spare, valid]
    in_range = _topk_over(J, C)
    k = ishape[2]
    if isinstance(k, int) and k == 0:
        raise NoMatch("the indexer picks no entry (k = 0)")
    _unwritten_until_output(core, None, [], extra=(window, J))
    # where the picks' range is not provably [-1, C), the rewrite sets those >= C to -1: HF's spare
    # column drops a pick equal to C (and a larger one fails its scatter)
    return window, J, k, W, chain, (None if in_range else spare_value)


def _unwritten_until_output(core: _Core, kv: fx.Node | None, repeats: list[fx.Node], extra=()) -> None:
    """The op runs where the core's output was: each tensor it reads (Q, kv, the mask, the sinks)
    must hold, there, what the core's first read of it saw. HF's repeat of one head is a view, so a
    write to kv between the scores and P @ V would reach V but not the scores."""
    from mla_compile.passes.contraction import _position, _root, _unwritten

    pos = _position(core.output.graph)
    inside = set(core.nodes) | set(repeats)
    for node in (core.q, kv, core.mask, core.sinks) + tuple(extra):
        if not isinstance(node, fx.Node):
            continue
        first_read = min((pos[u] for u in node.users if u in inside), default=pos[core.output])
        if node in extra:       # the gathered form's window mask and picks: from their first read on
            first_read = min(pos[u] for u in node.users)
        if not _unwritten(_root(node), first_read, pos[core.output], pos):
            raise NoMatch(f"{node.name} is written in place between its reads and the attention's output")
