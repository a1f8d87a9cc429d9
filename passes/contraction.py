"""Find MLA written as products in any layout (einsum, bmm, matmul, `@`): absorbed, or expanded.

DeepSeek's own inference code (`attn_impl="absorb"`) and similar references write MLA in the latent
parametrisation, with einsum in a [B, S, H, *] layout:

    q_lat  = einsum("bshd,hdc->bshc", q_nope, W_UK)                 W_UK = wkv_b.view(H, -1, r)[:, :dn]
    scores = (einsum("bshc,btc->bsht", q_lat, c) + einsum("bshr,btr->bsht", q_pe, kp)) * scale
    scores += mask                                                  (any mask with one head: [.., S, 1, T])
    P      = softmax(scores, -1)                                    (float32 or not, cast back or not)
    o_lat  = einsum("bsht,btc->bshc", P, c)                         the same latent c
    out    = einsum("bshc,hdc->bshd", o_lat, W_UV)                  W_UV = wkv_b.view(H, -1, r)[:, -dv:]

Nothing here depends on letters, operand order, layout or the op that spells a product. Every
product is first read as an einsum (letters per axis; a transpose or permute of an operand only
relabels its axes, an upcast changes no value), then each axis is given a role (B, S, H, T, and the
contracted widths C = r, D = dn, R = dr, E = dv) by what the products do: T is the softmax axis, C
the axis the values are summed over after P, H the axis the output projection shares with its
weight, and so on. A region is taken only if every product contracts exactly the axis its role says,
every operand has exactly the axes it must (a per-head key or value is not a shared latent), every
size agrees with its role (no broadcast), the two reads of the latent are provably the same values,
and nothing mutates an input between its reads and the rewritten op. The region then runs as the
absorbed (or expanded) op on operands permuted into its [B, H, S, *] layout, the output permuted
back: exactly the same sums, in the same float32-or-wider precision.

Where P multiplies per-head values instead, the expanded spelling is read (`_match_expanded`:
DeepSeek's MHA prefill, K = cat([k_nope, kp.expand]) and V from one split of the latent's expansion);
values kept outside the graph (DeepSeek's `attn_impl="naive"` caches of expanded K/V) have no latent
to attend over, and the log says so.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from mla_compile.passes.match import (
    NoMatch, Region, _is_fn, _is_method, _same, _shape, _static, _val, module_of,
)

EINSUM = (torch.einsum, torch.functional.einsum)
PRODUCTS = EINSUM + (torch.matmul, torch.bmm, operator.matmul)
SOFTMAX = (F.softmax, torch.softmax)
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Ops that return a view of their first operand: a mutation of one is a mutation of the other.
VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "flatten",
                "unflatten", "narrow", "select", "as_strided", "t", "contiguous", "view_as", "split"}

VIEW_FUNCTIONS = (operator.getitem, torch.split, torch.functional.split, torch.chunk, torch.transpose, torch.permute,
                  torch.unsqueeze, torch.squeeze, torch.narrow, torch.select, torch.flatten, torch.reshape,
                  torch.view_as_real, torch.view_as_complex)


def is_product(n: Any) -> bool:
    return _is_fn(n, *PRODUCTS)


@dataclass
class Product:
    """A product read as an einsum: out[lo] = sum over the rest of a[la] * b[lb]. `a` and `b` are the
    operands behind any transposes and upcasts (whose nodes are in `via`)."""

    node: fx.Node
    a: fx.Node
    b: fx.Node
    la: str
    lb: str
    lo: str
    via: list[fx.Node]
    unit: frozenset = frozenset()      # letters of size-1 axes in one operand only (broadcast)

    @property
    def summed(self) -> set[str]:
        return (set(self.la) | set(self.lb)) - set(self.lo) - set(self.unit)


def _parse_einsum(n: fx.Node) -> tuple[list[str], str, list[Any]]:
    """(input letters per operand, output letters, operands) of an einsum node."""
    eq = n.args[0] if n.args else n.kwargs.get("equation")
    ops = list(n.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str):
        raise NoMatch("einsum equation is not a constant string")
    eq = eq.replace(" ", "")
    if "." in eq:
        raise NoMatch(f"einsum {eq!r} uses '...'; only explicit letters are read")
    if "->" in eq:
        lhs, lo = eq.split("->")
    else:                                   # implicit output: the letters seen once, sorted
        lhs = eq
        flat = lhs.replace(",", "")
        lo = "".join(sorted(c for c in set(flat) if flat.count(c) == 1))
    return lhs.split(","), lo, ops


def product(n: fx.Node) -> Product:
    """n (einsum / matmul / bmm / @ of two tensors) as an einsum over the operands' own axes."""
    if _is_fn(n, *EINSUM):
        ins, lo, ops = _parse_einsum(n)
        if len(ins) != 2 or len(ops) != 2:
            raise NoMatch(f"einsum of {len(ops)} operands; attention products have two")
        la, lb = ins
    else:
        if len(n.args) != 2 or n.kwargs:
            raise NoMatch(f"{n.name}: a product with other than two positional operands")
        ops = list(n.args)
        ra, rb = (len(_shape(o, f"{n.name}'s operand")) for o in ops)
        if _is_fn(n, torch.bmm) and (ra, rb) != (3, 3):
            raise NoMatch("bmm of operands that are not 3-D")
        if ra != rb or ra < 2:
            # matmul broadcasting of unequal ranks (or vectors) is read only where ranks match
            raise NoMatch(f"{n.name}: a product of {ra}-D by {rb}-D operands")
        # A batch axis of size 1 against a larger one is broadcast: it gets a letter of its own,
        # summed over one element (exact), and the caller sees it as a unit axis.
        sa, sb = _shape(ops[0], "operand"), _shape(ops[1], "operand")
        la = lb = lo = ""
        for i in range(ra - 2):
            shared = LETTERS[3 + i]
            if _same(sa[i], sb[i]):
                la, lb, lo = la + shared, lb + shared, lo + shared
            elif _same(sa[i], 1):
                la, lb, lo = la + LETTERS[30 + i], lb + shared, lo + shared
            elif _same(sb[i], 1):
                la, lb, lo = la + shared, lb + LETTERS[30 + i], lo + shared
            else:
                raise NoMatch(f"{n.name}: batch axes of sizes {sa[i]} and {sb[i]}")
        la, lb, lo = la + "ab", lb + "bc", lo + "ac"
    for name, letters, op in (("first", la, ops[0]), ("second", lb, ops[1])):
        if len(set(letters)) != len(letters):
            raise NoMatch(f"{n.name}: the {name} operand repeats a letter ({letters!r}: a diagonal)")
        if len(_shape(op, f"{n.name}'s {name} operand")) != len(letters):
            raise NoMatch(f"{n.name}: {letters!r} does not name every axis of the {name} operand")
    if len(set(lo)) != len(lo) or not set(lo) <= set(la) | set(lb):
        raise NoMatch(f"{n.name}: output letters {lo!r} are not distinct input letters")
    via: list[fx.Node] = []
    a, la = behind(ops[0], la, via)
    b, lb = behind(ops[1], lb, via)
    sa, sb = _shape(a, "operand"), _shape(b, "operand")
    unit = frozenset(c for c, size in list(zip(la, sa)) + list(zip(lb, sb))
                     if _same(size, 1) and c not in lo and (c in la) != (c in lb))
    return Product(n, a, b, la, lb, lo, via, unit)


def behind(x: Any, letters: str, via: list[fx.Node]) -> tuple[fx.Node, str]:
    """Walk x back through transposes, permutes and upcasts, relabelling: returns the tensor they
    start from and the letters of its own axes. A transpose or permute moves values, never changes
    them; a cast is taken only where it cannot round (to a dtype at least as wide, or the same)."""
    while isinstance(x, fx.Node):
        src = x.args[0] if x.args else None
        if _is_method(x, "transpose") or _is_fn(x, torch.transpose):
            dims = [d for d in x.args[1:3]]
            if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
                break
            i, j = (d % len(letters) for d in dims)
            ls = list(letters)
            ls[i], ls[j] = ls[j], ls[i]
            letters = "".join(ls)
        elif _is_method(x, "permute") or _is_fn(x, torch.permute):
            dims = x.args[1:] if _is_method(x, "permute") else x.args[1]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            dims = list(dims)
            if sorted(d % len(letters) for d in dims if isinstance(d, int)) != list(range(len(letters))):
                break
            ls = [""] * len(letters)
            for k, d in enumerate(dims):        # out axis k is input axis dims[k]
                ls[d % len(letters)] = letters[k]
            letters = "".join(ls)
        elif _is_method(x, "t") and len(letters) == 2:
            letters = letters[::-1]
        elif _is_method(x, "float", "double", "to", "type_as", "type", "contiguous") and _widening(x):
            pass
        else:
            break
        via.append(x)
        x = src
    if not isinstance(x, fx.Node):
        raise NoMatch("a product's operand is not a tensor")
    return x, letters


def _widening(x: fx.Node) -> bool:
    """x is a cast (or contiguous) that keeps every value exactly: same dtype, or a wider float."""
    out, src = _val(x), _val(x.args[0])
    if out is None or src is None or tuple(out.shape) != tuple(src.shape):
        return False
    if out.dtype == src.dtype:
        return True
    return (out.dtype.is_floating_point and src.dtype.is_floating_point
            and torch.finfo(out.dtype).bits >= torch.finfo(src.dtype).bits
            and torch.finfo(out.dtype).eps <= torch.finfo(src.dtype).eps)


def _is_float_cast(x: fx.Node) -> bool:
    out, src = _val(x), _val(x.args[0])
    return (out is not None and src is not None and tuple(out.shape) == tuple(src.shape)
            and out.dtype.is_floating_point and src.dtype.is_floating_point)


def _roles_of(letters: str, roles: dict[str, str], unit=frozenset()) -> str:
    """Each letter's role; "1" for a unit (size-1, broadcast) axis."""
    return "".join("1" if c in unit else roles[c] for c in letters)


def _perm(have: str, want: str) -> tuple[int, ...]:
    """The permute that takes axes in role order `have` to role order `want`."""
    return tuple(have.index(r) for r in want)


# --------------------------------------------------------------------------------------------- #

def _softmax_of(x: Any, via: list[fx.Node]) -> tuple[fx.Node, int]:
    """Walk back from a product operand to the softmax that made it (through casts, a no-op dropout,
    transposes are not allowed here: P is taken in the softmax's own layout). Returns (softmax, dim)."""
    for _ in range(4):
        if _is_fn(x, *SOFTMAX) or _is_method(x, "softmax"):
            dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim")
            if not isinstance(dim, int):
                raise NoMatch("the softmax dimension is not a constant")
            rank = len(_shape(x, "the softmax"))
            return x, dim % rank
        if _is_fn(x, F.dropout):
            p = x.args[1] if len(x.args) > 1 else x.kwargs.get("p", 0.5)
            training = x.args[2] if len(x.args) > 2 else x.kwargs.get("training", True)
            if p != 0.0 and training:
                raise NoMatch("attention dropout is active (training with dropout > 0)")
        elif not (_is_method(x, "float", "to", "type_as", "type") and _is_float_cast(x)):
            # P may be rounded to the model's dtype after a float32 softmax (HF does the same);
            # the forms keep it in float32, which is at least as exact.
            break
        via.append(x)
        x = x.args[0]
    raise NoMatch("no softmax behind this product")


def softmax_operand(n: fx.Node) -> int | None:
    """Which operand (0 or 1) of product n comes from a softmax, or None."""
    ops = n.args[1:] if _is_fn(n, *EINSUM) else n.args
    if _is_fn(n, *EINSUM) and len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    for i, o in enumerate(ops[:2]):
        try:
            _softmax_of(o, [])
            return i
        except NoMatch:
            continue
    return None


def _only_users(n: fx.Node, allowed: set[fx.Node], what: str) -> None:
    extra = [u for u in n.users if u not in allowed]
    if extra:
        raise NoMatch(f"{what} ({n.name}) is also used by {', '.join(u.name for u in extra)} outside the attention")


def _position(g: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(g.nodes)}


def _root(x: fx.Node) -> fx.Node:
    """The tensor whose storage x views (through getitem / view-like methods)."""
    while isinstance(x, fx.Node) and x.args and isinstance(x.args[0], fx.Node) and (
            _is_fn(x, *VIEW_FUNCTIONS) or (x.op == "call_method" and x.target in VIEW_METHODS)):
        x = x.args[0]
    return x


def _mutates(n: fx.Node) -> fx.Node | None:
    """The tensor n writes in place, if it is a write (setitem, x.op_(), x += y, out=...)."""
    if _is_fn(n, operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow):
        return n.args[0] if isinstance(n.args[0], fx.Node) else None
    if n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__"):
        return n.args[0] if isinstance(n.args[0], fx.Node) else None
    if n.op == "call_function" and isinstance(n.kwargs.get("out"), fx.Node):
        return n.kwargs["out"]
    return None


def _same_values(a: fx.Node, b: fx.Node, pos: dict[fx.Node, int]) -> bool:
    """a and b hold the same values: the same node, or the same read (getitem with an equal index)
    of one tensor with no write to that tensor between the two reads."""
    if a is b:
        return True
    if not (_is_fn(a, operator.getitem) and _is_fn(b, operator.getitem)):
        return False
    if a.args[0] is not b.args[0] or a.args[1] != b.args[1]:
        return False
    return _unwritten(_root(a), min(pos[a], pos[b]), max(pos[a], pos[b]), pos)


def _unwritten(root: fx.Node, start: int, end: int, pos: dict[fx.Node, int]) -> bool:
    for n, i in pos.items():
        if start < i < end:
            target = _mutates(n)
            if target is not None and _root(target) is root:
                return False
    return True


# --------------------------------------------------------------------------------------------- #

@dataclass
class _Term:
    product: Product
    query: fx.Node
    query_roles: str
    key: fx.Node
    key_roles: str


def _scores(sm: fx.Node) -> tuple[list[fx.Node], fx.Node | None, float, list[fx.Node]]:
    """Walk back from the softmax: scores = (sum of products) * constant [+ float mask]. Returns
    (the score products, the mask or None, the scale, the add / mul nodes in between)."""
    x = sm.args[0]
    dtype_kw = sm.kwargs.get("dtype")
    if dtype_kw is not None and dtype_kw not in (torch.float32, torch.float64):
        raise NoMatch(f"the softmax runs in {dtype_kw}")
    chain: list[fx.Node] = []
    mask, scale = None, 1.0
    if _is_fn(x, operator.add, operator.iadd, torch.add) and not (len(x.args) > 2 or x.kwargs) \
            and not (is_product(x.args[0]) and is_product(x.args[1])):     # (that is the terms' sum)
        first, second = x.args[0], x.args[1]
        if _is_fn(x, operator.iadd) or _is_scaled_sum(first):
            body, mask = first, second
        elif _is_scaled_sum(second):
            body, mask = second, first
        else:
            raise NoMatch("the scores are a sum whose parts are not (products) * scale and a mask")
        if not isinstance(mask, fx.Node):
            raise NoMatch("the added mask is not a tensor")
        mv = _val(mask)
        if mv is None or not mv.dtype.is_floating_point:
            # the forms read a bool mask as "attend here"; added to scores, a bool adds 0 or 1
            raise NoMatch("the mask added to the scores is not a float tensor")
        chain.append(x)
        x = body
    while True:
        if _is_fn(x, operator.mul, torch.mul) and len(x.args) == 2 and isinstance(x.args[1], (int, float)):
            scale *= float(x.args[1])
            chain.append(x)
            x = x.args[0]
        elif _is_fn(x, operator.mul, torch.mul) and len(x.args) == 2 and isinstance(x.args[0], (int, float)):
            scale *= float(x.args[0])
            chain.append(x)
            x = x.args[1]
        elif _is_fn(x, operator.truediv, torch.div) and len(x.args) == 2 and not x.kwargs \
                and isinstance(x.args[1], (int, float)):
            scale /= float(x.args[1])
            chain.append(x)
            x = x.args[0]
        else:
            break
    if _is_fn(x, operator.add, operator.iadd, torch.add) and not (len(x.args) > 2 or x.kwargs):
        chain.append(x)
        term_nodes = list(x.args)
    else:
        term_nodes = [x]
    if any(isinstance(tn, fx.Node) and tn.op == "placeholder" for tn in term_nodes):
        raise NoMatch("the scores are an input of this graph: a graph break (such as a data-dependent "
                      "assert) separates the score products from the softmax, so no graph holds the whole core "
                      "(the record of the graph before the break names it)")
    if not all(is_product(tn) for tn in term_nodes):
        raise NoMatch("the scores are not products (q . c [+ q_pe . kp]) times a constant scale")

    return term_nodes, mask, scale, chain


def match_absorbed(pv_node: fx.Node) -> Region:
    """The absorbed MLA region whose P @ c product is pv_node (see the module docstring)."""
    pos = _position(pv_node.graph)

    # 1. o_lat = P @ c: P's last role is the softmax axis T; the other operand must be the latent,
    #    axes exactly {B, T, C} (a per-head value is an expanded V, not a latent).
    pv = product(pv_node)
    p_via: list[fx.Node] = []
    side = softmax_operand(pv_node)
    if side is None:
        raise NoMatch("no softmax behind P @ V")
    p_node, lp, lat2, lv = (pv.a, pv.la, pv.b, pv.lb) if side == 0 else (pv.b, pv.lb, pv.a, pv.la)
    sm, sd = _softmax_of(p_node, p_via)
    try:
        _scores(sm)
    except NoMatch as e:        # said first: whatever else fails follows from the break
        if "an input of this graph" in str(e):
            raise
    if len(lp) != 4:
        raise NoMatch(f"P is {len(lp)}-D; expected [B, S, H, T] in some order (axes merged by a reshape, "
                      "e.g. heads with queries for bmm, are not read)")
    t = lp[sd]
    if pv.summed != {t}:
        raise NoMatch(f"P @ V sums over {sorted(pv.summed)}, not only the softmax axis")
    lv_all, lv = lv, "".join(c for c in lv if c not in pv.unit)     # a broadcast head axis of 1 is no head
    shared = [c for c in lv if c in lp and c != t]
    if len(lv) == 4 and len(shared) == 2:
        return _match_expanded(pv, sm, sd, p_via, lp, lat2, lv, pos)
    if len(lv) != 3 or t not in lv or len(shared) != 1:
        raise NoMatch(f"the values are not a shared latent [B, T, r] (their axes are {lv!r} against P's {lp!r})")
    b_ = shared[0]
    c_ = next(c for c in lv if c not in (t, b_))
    x_, y_ = (c for c in lp if c not in (t, b_))
    if sorted(pv.lo) != sorted(b_ + x_ + y_ + c_):
        raise NoMatch(f"P @ V's output axes {pv.lo!r} are not P's batch, query and head axes and r")

    # 2. out = o_lat @ W_UV: the one axis the weight shares with o_lat is H; r is summed; dv is new.
    users = list(pv_node.users)
    if len(users) != 1:
        raise NoMatch("the latent output o_lat is read by more than the output projection")
    out_node = users[0]
    if not is_product(out_node):
        raise NoMatch("o_lat does not go straight into a product with W_UV (the output projection)")
    oc = product(out_node)
    if oc.a is pv_node:
        lq, w_uv, lw = oc.la, oc.b, oc.lb
    elif oc.b is pv_node:
        lq, w_uv, lw = oc.lb, oc.a, oc.la
    else:
        raise NoMatch("the output projection does not read o_lat")
    q_of = dict(zip(pv.lo, lq))      # pv's output letter -> this product's letter for the same axis
    c2 = q_of[c_]
    if oc.summed != {c2} or len(lw) != 3 or c2 not in lw:
        raise NoMatch(f"the output projection sums over {sorted(oc.summed)}, not only o_lat's r axis")
    h2 = [c for c in lw if c in lq and c != c2]
    if len(h2) != 1:
        raise NoMatch("W_UV does not share exactly one (head) axis with o_lat")
    h2 = h2[0]
    e2 = next(c for c in lw if c not in (h2, c2))
    if sorted(oc.lo) != sorted(q_of[b_] + q_of[x_] + q_of[y_] + e2):
        raise NoMatch("the output projection's output axes are not [B, S, H, dv] in some order")
    h_ = next(k for k, v in q_of.items() if v == h2)
    s_ = x_ if h_ == y_ else y_
    if h_ not in (x_, y_):
        raise NoMatch("the head axis of W_UV is not one of P's axes")
    pv_roles = {b_: "B", h_: "H", s_: "S", c_: "C", t: "T"}
    roles = {q_of[k]: v for k, v in pv_roles.items() if k in q_of}
    roles[e2] = "E"
    out_roles = _roles_of(oc.lo, roles)
    w_uv_roles = _roles_of(lw, roles)
    lat2_roles = _roles_of(lv_all, pv_roles, pv.unit)
    scores_roles = _roles_of(lp, pv_roles)      # P has the softmax's own layout

    # 3. scores = (sum of terms) * scale + mask, walked back from the softmax.
    term_nodes, mask, scale, chain = _scores(sm)
    terms = []
    for tn in term_nodes:
        tp = product(tn)
        if len(tp.lo) != 4:
            raise NoMatch(f"a score product gives {len(tp.lo)}-D scores")
        troles = dict(zip(tp.lo, scores_roles))
        if len(tp.summed) != 1:
            raise NoMatch(f"a score product sums over {sorted(tp.summed)}, not one axis")
        k = next(iter(tp.summed))
        troles[k] = "K"
        t_l = tp.lo[scores_roles.index("T")]
        key_first = t_l in tp.la
        qn, ql, kn, kl = (tp.b, tp.lb, tp.a, tp.la) if key_first else (tp.a, tp.la, tp.b, tp.lb)
        try:
            qr, kr = _roles_of(ql, troles, tp.unit), _roles_of(kl, troles, tp.unit)
        except KeyError:
            raise NoMatch("a score product has an axis that is neither summed nor in its output") from None
        if sorted(kr.replace("1", "", 1)) != sorted("BTK"):
            raise NoMatch(f"a score product's key has axes {kr} (roles), not a shared [B, T, d] key: "
                          "a per-head key is not MLA's shared latent or RoPE key")
        if sorted(qr) != sorted("BSHK"):
            raise NoMatch(f"a score product's query has axes {qr} (roles), not [B, S, H, d]")
        terms.append(_Term(tp, qn, qr, kn, kr))

    nope = [tm for tm in terms if _same_values(tm.key, lat2, pos)]
    rope = [tm for tm in terms if tm not in nope]
    if len(nope) != 1:
        raise NoMatch("no score product reads the same latent that P multiplies (q_lat . c)"
                      if not nope else "two score products read the latent")
    if len(rope) != 1:
        raise NoMatch("the scores have no separate RoPE term (q_pe . kp)" if not rope
                      else "the scores have more than one RoPE term")
    nope, rope = nope[0], rope[0]
    lat_roles = nope.key_roles.replace("K", "C")
    # The two reads of the latent may list its axes in different orders only if they are the same
    # tensor read the same way, which _same_values proved; their role orders must then agree.
    if nope.key_roles.replace("K", "C") != lat2_roles:
        raise NoMatch("the latent is read with its axes in different roles by the scores and by P @ c")

    # 4. q_lat = q_nope @ W_UK: the weight has exactly {H, D, C}; q_nope exactly {B, S, H, D}.
    qa_node = nope.query
    if not is_product(qa_node):
        raise NoMatch("the query against the latent is not absorbed (q_nope @ W_UK) in this graph")
    qa = product(qa_node)
    qa_roles = dict(zip(qa.lo, nope.query_roles.replace("K", "C")))
    if len(qa.summed) != 1 or len(qa.lo) != 4:
        raise NoMatch(f"the absorption sums over {sorted(qa.summed)}, not one axis")
    qa_roles[next(iter(qa.summed))] = "D"
    try:
        ra, rb = _roles_of(qa.la, qa_roles), _roles_of(qa.lb, qa_roles)
    except KeyError:
        raise NoMatch("the absorption has an axis that is neither summed nor in its output") from None
    if sorted(ra) == sorted("HDC") and sorted(rb) == sorted("BSHD"):
        w_uk, w_uk_roles, q_nope, q_nope_roles = qa.a, ra, qa.b, rb
    elif sorted(rb) == sorted("HDC") and sorted(ra) == sorted("BSHD"):
        w_uk, w_uk_roles, q_nope, q_nope_roles = qa.b, rb, qa.a, ra
    else:
        raise NoMatch(f"the absorption multiplies axes {ra} by {rb} (roles), not q_nope [B, S, H, D] by "
                      "W_UK [H, D, r]")
    rope_q_roles = rope.query_roles.replace("K", "R")
    kp_roles = rope.key_roles.replace("K", "R")

    # 5. Every size must be its role's size: no broadcast hides anywhere.
    sizes = _sizes(((q_nope, q_nope_roles, "q_nope"), (w_uk, w_uk_roles, "W_UK"), (lat2, lat2_roles, "latent"),
                    (nope.key, lat_roles, "latent"), (rope.query, rope_q_roles, "q_pe"),
                    (rope.key, kp_roles, "the RoPE key"), (w_uv, w_uv_roles, "W_UV"),
                    (out_node, out_roles, "the output"), (sm, scores_roles, "the scores")))

    # 6. The mask, 7. the region's own nodes read only inside it, its inputs unwritten until the op.
    mask_view = _mask_layout(mask, scores_roles, sizes)
    im = index_mask(mask, scores_roles, sizes)
    inner = [sm, *p_via, pv_node, *pv.via, out_node, *oc.via, *chain, qa_node, *qa.via, *(im.nodes if im else [])]
    for tm in terms:
        inner += [tm.product.node, *tm.product.via]
    if lat2 is not nope.key:
        inner.append(lat2)
    inner = _checked_inner(inner, [q_nope, w_uk, nope.key, rope.query, rope.key, w_uv, *_mask_inputs(mask, im)],
                           out_node, pos)
    return _region(out_node, pv_node, sizes, scale, mask, inner, index=im, q_nope=q_nope, q_rope=rope.query,
                   latent=nope.key, k_rope=rope.key, weight=None, w_uk=w_uk, w_uv=w_uv,
                   layout=dict(q_nope=_perm(q_nope_roles, "BHSD"), q_rope=_perm(rope_q_roles, "BHSR"),
                               latent=_perm(lat_roles, "B1TC" if "1" in lat_roles else "BTC"),
                               k_rope=_perm(kp_roles, "B1TR" if "1" in kp_roles else "BTR"),
                               w_uk=_perm(w_uk_roles, "HDC"), w_uv=_perm(w_uv_roles, "HEC"),
                               output=_perm("BHSE", out_roles), mask=mask_view))


def _match_expanded(pv: Product, sm: fx.Node, sd: int, p_via: list[fx.Node], lp: str, v: fx.Node, lv: str,
                    pos: dict[fx.Node, int]) -> Region:
    """P @ V with per-head values, read as the expanded form (DeepSeek's MHA prefill spelling):

        X = linear(c, W).view(B, T, H, dn+dv);  k_nope, V = X.split([dn, dv], -1)
        K = cat([k_nope, kp.expand(-1, -1, H, -1)], -1)          kp [B, T, 1, dr]
        scores = einsum(Q, K) * scale [+ mask];  out = einsum(softmax(scores), V)

    A view is a row-major reinterpretation, so the view's output shape [B, T, H, dn+dv] (in that
    order) is what proves it splits only the linear's last dim into heads: the roles of V's and K's
    axes are therefore fixed by position, and each product must use them as such."""
    t = lp[sd]
    # V's (and X's) axes by position: B, T, H, E (dv)
    v_roles = dict(zip(lv, "BTHE"))
    if lv[1] != t or lv[0] not in lp or lv[2] not in lp or lv[3] in lp or lv[3] not in pv.lo:
        raise NoMatch(f"the values have a head axis (per-head V, {_origin(v)}), but P @ V does not read them "
                      f"as [B, T, H, dv] split from one latent expansion (axes {lv!r} against P's {lp!r})")
    s_ = next(c for c in lp if c not in lv)
    pv_roles = {**v_roles, s_: "S"}
    scores_roles = _roles_of(lp, pv_roles)
    out_roles = _roles_of(pv.lo, pv_roles)
    if sorted(out_roles) != sorted("BSHE"):
        raise NoMatch(f"P @ V's output axes {pv.lo!r} are not [B, S, H, dv] in some order")

    # V (and K) read back from a cache buffer the graph has just written them into, whole (DeepSeek's
    # naive prefill from position 0): the read holds exactly the written values
    reads, v_read = [], v
    v = _written_then_read(v_read, pos)
    if v is not v_read:
        reads.append(v_read)
    try:
        split = _item_of_split(v, 1)
    except NoMatch:
        raise NoMatch(f"the values have a head axis (per-head V, {_origin(v)}) and are not the second half of "
                      f"a latent expansion's split in this graph: P does not multiply a shared latent"
                      f"{_partial_write(v, pos)}") from None
    x = split.args[0]
    if not (_is_method(x, "view", "reshape") and _is_fn(x.args[0], F.linear, torch._C._nn.linear)):
        raise NoMatch(f"the per-head values ({_origin(v)}) are not a view of a linear layer (the latent's expansion)")
    lin = x.args[0]
    if len(lin.args) > 2 and lin.args[2] is not None or lin.kwargs.get("bias") is not None:
        raise NoMatch("the expansion has a bias (kv_b_proj with bias is not absorbed)")
    latent, weight = lin.args[0], lin.args[1]

    term_nodes, mask, scale, chain = _scores(sm)
    if len(term_nodes) != 1:
        raise NoMatch("the expanded scores are a sum of products; only Q . K with K = [k_nope, RoPE key] is read")
    tp = product(term_nodes[0])
    if len(tp.lo) != 4 or len(tp.summed) != 1:
        raise NoMatch("the score product is not [B, S, H, T] summed over one axis")
    troles = dict(zip(tp.lo, scores_roles))
    troles[next(iter(tp.summed))] = "K"
    t_l = tp.lo[scores_roles.index("T")]
    qn, ql, kn, kl = (tp.b, tp.lb, tp.a, tp.la) if t_l in tp.la else (tp.a, tp.la, tp.b, tp.lb)
    k_read = kn
    kn = _written_then_read(k_read, pos)
    if kn is not k_read:
        reads.append(k_read)
    try:
        q_roles, k_roles = _roles_of(ql, troles, tp.unit), _roles_of(kl, troles, tp.unit)
    except KeyError:
        raise NoMatch("the score product has an axis that is neither summed nor in its output") from None
    if k_roles != "BTHK":
        raise NoMatch(f"the score product reads K's axes as {k_roles} (roles), not in the expansion's own "
                      "[B, T, H, d] order: a permuted K")
    if sorted(q_roles) != sorted("BSHK"):
        raise NoMatch(f"Q's axes are {q_roles} (roles), expected [B, S, H, dn+dr] in some order")
    if not _is_fn(kn, torch.cat):
        raise NoMatch("K is not cat([k_nope, RoPE key], -1)")
    parts, dim = kn.args[0], kn.args[1] if len(kn.args) > 1 else kn.kwargs.get("dim", 0)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (-1, 3)):
        raise NoMatch("K is a cat of other than [k_nope, RoPE key] over the last dim")
    try:
        k_split = _item_of_split(parts[0], 0)
    except NoMatch:
        k_split = None
    if k_split is not split:
        raise NoMatch("K's first part is not the first half of V's split (k_nope)")
    rope = parts[1]
    if not _is_method(rope, "expand"):
        raise NoMatch("K's RoPE part is not one shared key broadcast over heads (expand)")
    kp = rope.args[0]

    lat_shape = _shape(latent, "latent", (3, 4))
    lat_roles = "BTC" if len(lat_shape) == 3 else "B1TC"
    sizes = _sizes(((v, "BTHE", "V"), (x, "BTHX", "the expansion's view"), (kn, "BTHK", "K"),
                    (parts[0], "BTHD", "k_nope"), (rope, "BTHR", "the broadcast RoPE key"), (kp, "BT1R", "the RoPE key"),
                    (qn, q_roles, "Q"), (pv.node, out_roles, "the output"), (sm, scores_roles, "the scores"),
                    (latent, lat_roles, "latent")))
    dn, dr, dv, X = (_static(sizes[k], k) for k in "DREX")
    if X != dn + dv or sizes.pop("K") != dn + dr:
        raise NoMatch("the split is not [dn, dv] of the expansion, or K is not [k_nope, RoPE key]")
    rows, cols = _shape(weight, "kv_b_proj weight", 2)
    if not (_same(cols, sizes["C"]) and _same(rows, sizes["H"] * sizes["X"])):
        raise NoMatch(f"the weight {rows}x{cols} does not fit H={sizes['H']} heads of {sizes['X']} over r={sizes['C']}")
    from mla_compile.passes.match import _query_parts
    # Q's parts: its cat's operands where Q = cat([q_nope, q_pe], -1); else the rewrite permutes Q to
    # [B, H, S, dn+dr] and slices [..., :dn] and [..., dn:]
    q_nope, q_rope = _query_parts(qn, dn, dr) if q_roles[-1] == "K" else (None, None)
    mask_view = _mask_layout(mask, scores_roles, sizes)
    im = index_mask(mask, scores_roles, sizes)
    kv_nodes = [kn, parts[0], rope, v]
    inner = [sm, *p_via, pv.node, *pv.via, *chain, tp.node, *tp.via, *reads, *(im.nodes if im else [])]
    # the expansion itself (split, view, linear) is pure: erased once unread, kept where read elsewhere
    # (K and V too, where a cache write keeps them)
    inner = _checked_inner(inner + ([] if reads else kv_nodes), [qn, latent, kp, weight, *_mask_inputs(mask, im)],
                           pv.node, pos) + (kv_nodes if reads else []) + [split, x, lin]
    if q_nope is not None:
        q_perm, query_perm = _perm(q_roles.replace("K", "D"), "BHSD"), None
    else:
        q_perm, query_perm = None, _perm(q_roles, "BHSK")
    return _region(pv.node, pv.node, sizes, scale, mask, inner, index=im, query=qn, q_nope=q_nope, q_rope=q_rope,
                   latent=latent, k_rope=kp, weight=weight,
                   layout=dict(query=query_perm, q_nope=q_perm, q_rope=q_perm, k_rope=_perm("BT1R", "B1TR"),
                               output=_perm("BHSE", out_roles), mask=mask_view))


def _cache_write(r: Any, pos: dict[fx.Node, int]):
    """For r = buf[a:b, c:d] (slices only), the last setitem of buf before r in this graph: (write, buf)."""
    if not (_is_fn(r, operator.getitem) and isinstance(r.args[0], fx.Node) and isinstance(r.args[1], tuple)
            and all(isinstance(e, slice) for e in r.args[1])):
        return None
    buf = r.args[0]
    writes = [u for u in buf.users if _is_fn(u, operator.setitem) and u.args[0] is buf and pos[u] < pos[r]]
    return (max(writes, key=pos.get), buf) if writes else None


def _bounds(s: slice) -> tuple | None:
    if s.step not in (None, 1):
        return None
    return (0 if s.start is None else s.start), s.stop


def _written_then_read(r: Any, pos: dict[fx.Node, int]) -> Any:
    """r itself, or the tensor src where r = buf[:b, :t] reads back exactly what `buf[:b, 0:t] = src`
    wrote earlier in this graph: the same slices with the same static (or identical) bounds, from 0,
    src already of r's shape and dtype (no broadcast, no cast in the write) and no write to buf between."""
    found = _cache_write(r, pos)
    if found is None:
        return r
    w, buf = found
    ridx, widx, src = r.args[1], w.args[1], w.args[2]
    if not (isinstance(widx, tuple) and len(widx) == len(ridx) and all(isinstance(e, slice) for e in widx)):
        return r
    for a, b in zip(ridx, widx):
        ra, wb = _bounds(a), _bounds(b)
        if ra is None or wb is None or ra[0] != 0 or wb[0] != 0:
            return r
        if not (ra[1] is wb[1] or (isinstance(ra[1], int) and isinstance(wb[1], int) and ra[1] == wb[1])):
            return r
    vr, vs = _val(r), _val(src)
    if vr is None or vs is None or vr.dtype != vs.dtype or len(vr.shape) != len(vs.shape) \
            or not all(_same(x, y) for x, y in zip(vr.shape, vs.shape)):
        return r
    if not _unwritten(_root(buf), pos[w], pos[r], pos):
        return r
    return src


def _partial_write(r: Any, pos: dict[fx.Node, int]) -> str:
    """Why a read of a cache buffer written in this graph is not the written values, for the log."""
    found = _cache_write(r, pos)
    if found is None:
        return ""
    w, buf = found
    name = buf.target if buf.op == "placeholder" else buf.name
    return (f"; this graph writes {name}{_index_text(w.args[1])} and reads {name}{_index_text(r.args[1])}, not "
            "exactly the region written from position 0 with the same bounds: the rest holds values from earlier "
            "calls, which nothing in this graph proves are images of a latent")


def _index_text(idx: Any) -> str:
    def one(s):
        if not isinstance(s, slice):
            return "?"
        name = lambda b: "" if b is None else (b.name if isinstance(b, fx.Node) else str(b))  # noqa: E731
        return f"{name(s.start)}:{name(s.stop)}"
    return "[" + ", ".join(one(s) for s in (idx if isinstance(idx, tuple) else (idx,))) + "]"


def _item_of_split(n: Any, index: int) -> fx.Node:
    """The split node of which n is item `index`, if that split is [dn, dv] over the last dim."""
    if not (_is_fn(n, operator.getitem) and n.args[1] == index):
        raise NoMatch("expected an item of the expansion's split")
    split = n.args[0]
    if not (_is_fn(split, torch.split, torch.functional.split) or _is_method(split, "split")):
        raise NoMatch("expected an item of the expansion's split")
    sizes = split.args[1] if len(split.args) > 1 else split.kwargs.get("split_size_or_sections")
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not (isinstance(sizes, (list, tuple)) and len(sizes) == 2 and dim in (-1, 3)):
        raise NoMatch("the expansion's split is not [dn, dv] over the last dim")
    return split


def _sizes(entries) -> dict[str, Any]:
    """role -> size over (node, roles per axis, name) entries; NoMatch where one role has two sizes."""
    sizes: dict[str, Any] = {}
    for node, rl, what in entries:
        shape = _shape(node, what, len(rl))
        for role, size in zip(rl, shape):
            if role == "1":
                continue
            if role in sizes and not _same(sizes[role], size):
                raise NoMatch(f"{what}'s {role} axis is {size}, elsewhere {sizes[role]} (a broadcast): "
                              "not one consistent MLA shape")
            sizes.setdefault(role, size)
    return sizes


def _mask_layout(mask: fx.Node | None, scores_roles: str, sizes: dict[str, Any]):
    """The mask has one head (its H axis 1) and broadcasts to the scores: (leading unit axes to add,
    the permute of the scores' layout into [B, 1, S, T]); None without a mask."""
    if mask is None:
        return None
    mshape = _shape(mask, "the mask")
    if len(mshape) > 4:
        raise NoMatch(f"the mask is {len(mshape)}-D")
    full = (1,) * (4 - len(mshape)) + mshape
    for role, size in zip(scores_roles, full):
        if role == "H" and not _same(size, 1):
            raise NoMatch("the mask differs per head; the MLA forms take one mask for all heads")
        if not (_same(size, 1) or _same(size, sizes[role])):
            raise NoMatch(f"the mask's {role} axis is {size}, not 1 or {sizes[role]}")
    return 4 - len(mshape), _perm(scores_roles, "BHST")


def _checked_inner(inner: list[fx.Node], inputs: list, out_node: fx.Node, pos) -> list[fx.Node]:
    """The region's own nodes must be read only inside it (the rewrite erases them, and an in-place
    add read elsewhere would change meaning), and the op, which runs where the output was, must see
    each input as the region's first read of it did: no write to it in between."""
    inner = list(dict.fromkeys(inner))
    allowed = set(inner)
    for n in inner:
        if n is not out_node:
            _only_users(n, allowed, "a value inside the attention")
    for node in inputs:
        if node is None:
            continue
        first_read = min((pos[u] for u in node.users if u in allowed), default=pos[out_node])
        if not _unwritten(_root(node), first_read, pos[out_node], pos):
            raise NoMatch(f"{node.name} is written in place between its reads and the attention's output")
    return inner


def _mask_inputs(mask: fx.Node | None, im: "IndexMask | None") -> list:
    """What the op reads of the mask: the mask itself, or a top-k index mask's indices and base."""
    return [mask] if im is None else [im.indices, im.base]


def _region(out_node, pv_node, sizes, scale, mask, dead, index: "IndexMask | None" = None, **operands) -> Region:
    """The region; with a top-k index mask (`index`), a DSA region: the sparse forms read its indices
    and base mask, the dense forms the whole mask as written."""
    module, family = module_of(out_node)
    dims = dict(B=sizes["B"], H=_static(sizes["H"], "the head count"), S=sizes["S"], T=sizes["T"],
                r=_static(sizes["C"], "kv_lora_rank"), dr=_static(sizes["R"], "qk_rope_head_dim"),
                dn=_static(sizes["D"], "qk_nope_head_dim"), dv=_static(sizes["E"], "v_head_dim"),
                k=index.k if index is not None else None)
    query = operands.pop("query", operands.get("q_nope"))
    if index is not None:
        operands["layout"] = dict(operands.get("layout") or {}, topk_indices=index.roles, base_mask=index.base_view)
        dead = dead + index.loose
    return Region(module=module, family=family, core=getattr(pv_node.target, "__name__", "product"),
                  output=out_node, query=query, mask=mask, base_mask=index.base if index else None,
                  topk_indices=index.indices if index else None, topk=index.k if index else None,
                  cache_position=None, scale=scale, is_causal=False, dims=dims, dtype=_val(out_node).dtype,
                  dead=dead, **operands)


def _origin(v: fx.Node) -> str:
    """Where per-head values come from, in words: an expansion in this graph or an input (a cache)."""
    x = v
    for _ in range(8):
        if not isinstance(x, fx.Node):
            break
        if x.op == "placeholder":
            return f"an input of this graph, {x.target}: computed outside it (a cache, or before a graph break)"
        if _is_fn(x, F.linear, torch._C._nn.linear) or is_product(x):
            return "expanded in this graph from a projection of the latent"
        if not x.args or not isinstance(x.args[0], fx.Node):
            break
        x = x.args[0]
    return "of unknown origin"


def _is_scaled_sum(x: Any) -> bool:
    """x is (a sum of) products, possibly times constants: the score side of `scores + mask`."""
    for _ in range(4):
        if is_product(x):
            return True
        if _is_fn(x, operator.mul, torch.mul, operator.truediv, torch.div) and len(x.args) == 2:
            x = x.args[0] if isinstance(x.args[1], (int, float)) else x.args[1] \
                if isinstance(x.args[0], (int, float)) else None
        elif _is_fn(x, operator.add, torch.add) and len(x.args) == 2:
            return is_product(x.args[0]) and is_product(x.args[1])
        else:
            return False
    return False


# --------------------------------------------------------------------------------------------- #
# A dense top-k index mask in any spelling (DeepSeek-V3.2's and kin): -inf everywhere but zero at
# each row's selected keys, added to the scores before the softmax.

FILLS = ("full", "new_full", "full_like")


@dataclass
class IndexMask:
    """mask = fill(-inf) with zeros written at `indices` along the key axis [+ base], viewed to the
    scores: every key outside a row's selection is dropped, so the sparse forms attend only to the
    selection (with `base` read there)."""

    indices: fx.Node
    roles: str                 # the roles of the indices' axes; "K" is the selection's axis
    k: Any
    base: fx.Node | None       # a float mask added to the index mask, broadcast to it
    base_view: tuple           # (leading unit axes that give base the index mask's rank, its unsqueezes)
    nodes: list[fx.Node]       # the dense mask's own nodes (erased once nothing reads them)
    loose: list[fx.Node]       # nodes only the write reads (aranges): erased if then unread


def _fill_value(n: Any):
    """(fill value, dtype) when n is a constant fill (full / new_full / full_like), else None."""
    if _is_fn(n, torch.full):
        v = n.args[1] if len(n.args) > 1 else n.kwargs.get("fill_value")
    elif _is_method(n, "new_full"):
        v = n.args[2] if len(n.args) > 2 else n.kwargs.get("fill_value")
    elif _is_fn(n, torch.full_like):
        v = n.args[1] if len(n.args) > 1 else n.kwargs.get("fill_value")
    else:
        return None
    val = _val(n)
    return (v, val.dtype if val is not None else None)


def _is_scatter(n: Any) -> bool:
    return _is_method(n, "scatter", "scatter_") or _is_fn(n, torch.scatter)


def _unit_views(x: fx.Node, chain: list[fx.Node]) -> tuple[fx.Node, list[int]]:
    """Walk back from the mask through unsqueezes (and x[:, None]-style indexing that only adds unit
    axes): the tensor they start from and the unsqueezes, in the order they apply."""
    ups: list[int] = []
    while True:
        if (_is_method(x, "unsqueeze") or _is_fn(x, torch.unsqueeze)) and isinstance(
                d := (x.args[1] if len(x.args) > 1 else x.kwargs.get("dim")), int):
            ups.insert(0, d)
        elif _is_fn(x, operator.getitem) and isinstance(x.args[1], tuple) and None in x.args[1] \
                and all(e is None or e == slice(None) for e in x.args[1]):
            ups = [i for i, e in enumerate(x.args[1]) if e is None] + ups
        else:
            return x, ups
        chain.append(x)
        x = x.args[0]


def _distinct(idx: Any, axis: int) -> bool:
    """The values of idx along `axis` are distinct in every row: idx is a topk's indices over that
    axis (through integer casts, copies and indexing of other axes)."""
    for _ in range(8):
        if not isinstance(idx, fx.Node):
            return False
        if _is_fn(idx, operator.getitem) and idx.args[1] == 1 and (
                _is_method(idx.args[0], "topk") or _is_fn(idx.args[0], torch.topk)):
            t = idx.args[0]
            dim = t.args[2] if len(t.args) > 2 else t.kwargs.get("dim", -1)
            src = _val(t.args[0])
            return isinstance(dim, int) and src is not None and dim % src.dim() == axis
        if _is_method(idx, "long", "int", "clone", "contiguous", "to", "type"):
            v, s = _val(idx), _val(idx.args[0])
            if v is None or s is None or v.is_floating_point() or s.is_floating_point():
                return False
            idx = idx.args[0]
        elif (_is_method(idx, "unsqueeze") or _is_fn(idx, torch.unsqueeze)) and isinstance(idx.args[1], int):
            d = idx.args[1] % len(_shape(idx, "indices"))
            if axis == d:
                return False
            idx, axis = idx.args[0], axis - (axis > d)
        elif _is_fn(idx, operator.getitem):
            tup = idx.args[1] if isinstance(idx.args[1], tuple) else (idx.args[1],)
            if not all(isinstance(e, int) or e == slice(None) for e in tup):
                return False
            kept = [i for i, e in enumerate(tup) if not isinstance(e, int)]
            src_axis = kept[axis] if axis < len(kept) else len(tup) + axis - len(kept)
            if src_axis < len(tup) and tup[src_axis] != slice(None):
                return False
            idx, axis = idx.args[0], src_axis
        else:
            return False
    return False


def _arange_along(n: Any, axis: int, rank: int, size: Any) -> bool:
    """n is arange(size) shaped so that its one non-unit axis is `axis` of `rank` (x[:, None, None])."""
    if not _is_fn(n, operator.getitem) or not isinstance(n.args[1], tuple):
        return False
    tup = n.args[1]
    if len(tup) != rank or [i for i, e in enumerate(tup) if e is not None] != [axis] or tup[axis] != slice(None):
        return False
    a = n.args[0]
    if not _is_fn(a, torch.arange) or a.kwargs.get("step", 1) != 1:
        return False
    bounds = list(a.args)
    if len(bounds) == 1:
        bounds = [0] + bounds
    return len(bounds) in (2, 3) and bounds[0] == 0 and (len(bounds) == 2 or bounds[2] == 1) and _same(bounds[1], size)


def index_mask(mask: fx.Node | None, scores_roles: str, sizes: dict[str, Any]) -> IndexMask | None:
    """The mask added to the scores read as a top-k index mask, proven exactly: a fill of -inf (or
    finfo.min) whose key axis gets the value 0 at per-row indices (scatter / scatter_ along that axis,
    or an index assignment mask[b_ar, s_ar, idx] = 0 / mask[..., idx] = 0 with one 1-D idx for every
    row), those indices distinct in each row (a topk's), optionally plus a float base mask, then only
    unit axes added. None where the mask is not built from a fill and a write at indices; NoMatch
    where it is, but a step of that proof fails."""
    if mask is None:
        return None
    chain: list[fx.Node] = []
    x, ups = _unit_views(mask, chain)
    base, add = None, None
    if _is_fn(x, operator.add, operator.iadd, torch.add) and len(x.args) == 2 and not x.kwargs:
        a, b = x.args
        if _is_scatter(a) or _fill_value(a) is not None:
            core, base = a, b
        elif not _is_fn(x, operator.iadd) and (_is_scatter(b) or _fill_value(b) is not None):
            core, base = b, a
        else:
            return None
        add = x
        chain.append(x)
        x = core
    loose: list[fx.Node] = []
    if _is_scatter(x):
        fill, write = x.args[0], x
        dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim")
        idx = x.args[2] if len(x.args) > 2 else x.kwargs.get("index")
        value = x.args[3] if len(x.args) > 3 else x.kwargs.get("value", x.kwargs.get("src"))
        if _fill_value(fill) is None:
            return None
        if x.kwargs.get("reduce") is not None:
            raise NoMatch("the index mask is scattered with a reduction")
        if _is_method(x, "scatter_") and set(fill.users) != {x}:
            raise NoMatch(f"the dense mask {fill.name} that scatter_ writes is also read elsewhere")
        chain.append(x)
    elif _fill_value(x) is not None:
        fill = x
        writes = [u for u in fill.users if u not in chain and u is not add]
        if len(writes) != 1 or not (_is_method(writes[0], "scatter_") or _is_fn(writes[0], operator.setitem)) \
                or writes[0].args[0] is not fill or writes[0].users:
            raise NoMatch(f"the dense mask {fill.name} is written or read by "
                          f"{', '.join(u.name for u in writes) or 'nothing'} besides the scores: "
                          "not one write of zeros at the selected keys")
        write = writes[0]
        reads = [u for u in fill.users if u is not write]
        if any(_position_of(r) < _position_of(write) for r in reads):
            raise NoMatch("the dense mask is read before the selected keys are written")
        if _is_fn(write, operator.setitem):
            dim, idx, value = None, write.args[1], write.args[2]
        else:
            dim = write.args[1] if len(write.args) > 1 else write.kwargs.get("dim")
            idx = write.args[2] if len(write.args) > 2 else write.kwargs.get("index")
            value = write.args[3] if len(write.args) > 3 else write.kwargs.get("value", write.kwargs.get("src"))
            if write.kwargs.get("reduce") is not None:
                raise NoMatch("the index mask is scattered with a reduction")
        chain.append(write)
    else:
        return None
    chain.append(fill)

    v, dtype = _fill_value(fill)
    if dtype is None or not dtype.is_floating_point:
        raise NoMatch("the index mask is not a float tensor")
    if not (isinstance(v, (int, float)) and (v == float("-inf") or v == torch.finfo(dtype).min)):
        raise NoMatch(f"the index mask's fill value is {v!r}, not -inf (or finfo.min): keys outside the "
                      "selection are not dropped, so the sparse forms would not be exact")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0:
        raise NoMatch(f"the index mask gets {value!r} at the selected keys, not the constant 0")
    fshape = _shape(fill, "the index mask")
    xr = len(fshape)
    mshape = _shape(mask, "the mask")
    axes: list[int | None] = list(range(xr))
    for d in ups:
        axes.insert(d if d >= 0 else d + len(axes) + 1, None)
    if len(axes) != len(mshape) or len(axes) > len(scores_roles):
        raise NoMatch("the index mask's unsqueezes do not give the mask's shape")
    x_roles = [""] * xr
    for i, a in enumerate(axes):
        if a is not None:
            x_roles[a] = scores_roles[len(scores_roles) - len(axes) + i]

    if _is_fn(write, operator.setitem):
        tup = idx if isinstance(idx, tuple) else (idx,)
        tensors = [i for i, e in enumerate(tup) if isinstance(e, fx.Node)]
        if len(tensors) == 1 and all(e is Ellipsis or e == slice(None) for i, e in enumerate(tup) if i != tensors[0]):
            at = tensors[0]
            if Ellipsis in tup[:at]:
                if tup[at + 1:]:
                    raise NoMatch("the index assignment has axes after the key index past an ellipsis")
                dim = xr - 1
            else:
                if Ellipsis in tup[at + 1:] and len(tup) != at + 2:
                    raise NoMatch("the index assignment's layout is not read")
                dim = at
            idx = tup[at]
            ishape = _shape(idx, "the selected indices")
            if len(ishape) != 1:
                raise NoMatch(f"mask[..., idx] = 0 with a {len(ishape)}-D idx zeros the union of every row's "
                              "selection in every row: not a per-row top-k")
            roles, k = "K", ishape[0]
            axis = 0
        elif len(tensors) == len(tup) == xr:
            idx_at = [i for i in tensors if not _arange_along(tup[i], i, xr, fshape[i])]
            if len(idx_at) != 1:
                raise NoMatch("the index assignment's indices are not aranges over every axis but one")
            dim = idx_at[0]
            idx = tup[dim]
            loose = [tup[i] for i in tensors if i != dim] + [tup[i].args[0] for i in tensors if i != dim]
            ishape = _shape(idx, "the selected indices", xr)
            if any(not (_same(ishape[a], 1) or _same(ishape[a], fshape[a])) for a in range(xr) if a != dim):
                raise NoMatch(f"the selected indices {list(ishape)} do not broadcast over the mask {list(fshape)}")
            roles, k, axis = None, ishape[dim], dim
        else:
            raise NoMatch("the index assignment is not mask[..., idx] = 0 or mask[b_ar, s_ar, idx] = 0")
    else:
        if not isinstance(dim, int):
            raise NoMatch("the index mask is scattered along a non-constant axis")
        dim %= xr
        ishape = _shape(idx, "the selected indices", xr)
        if any(not _same(ishape[a], fshape[a]) for a in range(xr) if a != dim):
            raise NoMatch(f"the selected indices {list(ishape)} do not cover every row of the mask {list(fshape)}: "
                          "scatter writes only where the index reaches, other rows stay all -inf")
        roles, k, axis = None, ishape[dim], dim
    if x_roles[dim] != "T" or not _same(fshape[dim], sizes["T"]):
        raise NoMatch(f"the selected indices are written along the mask's {x_roles[dim] or 'broadcast'} axis, "
                      "not the key axis the softmax runs over")
    if roles is None:
        roles = "".join("K" if a == dim else x_roles[a] for a in range(xr))
    if any(r not in "BSK" and not _same(s, 1) for r, s in zip(roles, _shape(idx, "indices"))):
        raise NoMatch("the selected indices have an axis that is not batch or query")
    if not _distinct(idx, axis):
        raise NoMatch("the selected indices are not provably distinct in each row (not a topk's indices in "
                      "this graph): the sparse forms would count a repeated key twice")
    if base is not None:
        if not isinstance(base, fx.Node) or _val(base) is None or not _val(base).dtype.is_floating_point:
            raise NoMatch("the mask added to the index mask is not a float tensor")
        bshape = _shape(base, "the base mask")
        try:
            out = torch.broadcast_shapes(tuple(bshape), tuple(fshape))
        except Exception:  # noqa: BLE001 - symbolic sizes that do not compare: not proven
            raise NoMatch("the base mask does not broadcast to the index mask") from None
        if len(out) != xr or any(not _same(o, f) for o, f in zip(out, fshape)):
            raise NoMatch("the base mask widens the index mask")
    return IndexMask(indices=idx, roles=roles, k=k, base=base,
                     base_view=(xr - len(_shape(base, "the base mask")) if base is not None else 0, tuple(ups)),
                     nodes=chain, loose=loose)


def _position_of(n: fx.Node) -> int:
    for i, m in enumerate(n.graph.nodes):
        if m is n:
            return i
    raise NoMatch(f"{n.name} is not in the graph")
