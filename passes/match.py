"""Find MLA attention regions in a Dynamo FX graph, by structure.

A region is anchored at an attention core and traced back through its operands:

    core   eager:  matmul(dropout(softmax(matmul(Q, K^T) * scale [+ mask]).to()), V)
           sdpa:   scaled_dot_product_attention(Q, K, V, attn_mask=mask, scale=scale, is_causal=...)
    V      = split(X, [dn, dv], -1)[1]
    K      = new_empty(B, H, T, dn+dr) filled by copy_(K[..., :dn], split(X)[0])
                                          and copy_(K[..., dn:], kp.expand(-1, H, -1, -1))
             (or by assignments K[..., :dn] = ..., K[..., dn:] = kp, or cat([split(X)[0], kp.expand]))
    X      = linear(c, W).view(B, T, H, dn+dv).transpose(1, 2)        c: the latent [B, 1, T, r] or [B, T, r]
    Q      = cat((q_nope, q_rope), -1)
    mask   (DSA) = masked_fill(base, scatter(new_ones(..., bool), -1, idx, False).unsqueeze(1), min)
                or base & ~(that index mask)
                or any spelling passes/contraction.py's `index_mask` proves: full(-inf) with 0 written
                at per-row top-k indices along the key axis [+ base]

What matters is which tensor feeds which op and how dims split, never a variable name: W is
whatever weight the latent is multiplied with, H and the ranks come from tensor shapes.
Every anchor that fails a step becomes a `Miss` with the step that failed, so the log can say why a
near-miss was left alone; every shape is rank-checked before it is unpacked, and anything else a
match raises becomes a Miss naming the error. Attention written as other products (einsum, bmm,
`@`, any layout: DeepSeek's own code) is read by passes/contraction.py.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA = F.scaled_dot_product_attention


class NoMatch(Exception):
    """A step of the structural match failed; the message says which."""


@dataclass
class Region:
    """One matched MLA attention core and the graph nodes that feed it."""

    module: str
    family: str | None
    core: str                          # "eager" or "sdpa"
    output: fx.Node                    # the core's [B, H, S, dv] output (replaced by the rewrite)
    query: fx.Node                     # Q, [B, H, S, dn+dr]
    q_nope: fx.Node | None             # Q's parts when Q is their cat (else the rewrite slices Q)
    q_rope: fx.Node | None
    latent: fx.Node                    # c, [B, 1, T, r]
    k_rope: fx.Node                    # kp, [B, 1, T, dr]
    weight: fx.Node | None             # kv_b_proj.weight, [H*(dn+dv), r] (None: w_uk / w_uv given)
    mask: fx.Node | None               # the mask as HF hands it to the core
    base_mask: fx.Node | None          # DSA: the mask before the top-k index mask was applied
    topk_indices: fx.Node | None       # DSA: [B, S, k] int indices
    topk: Any                          # DSA: k (int or SymInt)
    cache_position: fx.Node | None     # StaticCache: positions written this step (latent.index_copy_)
    scale: float
    is_causal: bool
    dims: dict[str, Any]               # B, H, S, T, r, dr, dn, dv
    dtype: torch.dtype
    dead: list[fx.Node] = field(default_factory=list)   # nodes to erase once the core is replaced
    # A region written already absorbed (passes/contraction.py) names W_UK and W_UV itself, and its
    # operands may be laid out otherwise: `layout` holds, per op argument, the permute into the op's
    # layout, the permute of the op's [B, H, S, dv] output back ("output"), and for the mask the
    # 4-D shape to view it as and the permute to [B, 1, S, T] ("mask").
    w_uk: fx.Node | None = None
    w_uv: fx.Node | None = None
    layout: dict | None = None
    sinks: fx.Node | None = None       # attention sinks: the [H] logits (passes/sinks.py)
    # latent MQA (passes/shared_kv.py): K = V = `latent` [B, 1, T, D] repeated to the heads, no W_UK /
    # W_UV, no RoPE key; dims read r = dn = dv = D, dr = 0
    shared_kv: bool = False
    note: str | None = None            # a step that did not hold, for the log (the region is still taken)

    @property
    def is_sparse(self) -> bool:
        return self.topk_indices is not None


@dataclass
class Miss:
    """An attention core that looked like MLA but failed a step of the match."""

    module: str
    family: str | None
    core: str
    reason: str
    dims: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- #
# Small structural predicates over FX nodes (Dynamo emits torch functions and tensor methods).

def _is_fn(n: Any, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _is_method(n: Any, *names: str) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


def _arg(n: fx.Node, i: int, name: str, default=None):
    """Argument i of n counted after its first operand (self for a method, the input tensor for a
    function), positional or by keyword."""
    if len(n.args) > i + 1:
        return n.args[i + 1]
    return n.kwargs.get(name, default)


def _self(n: fx.Node) -> Any:
    return n.args[0]


def _val(n: Any):
    """The example value Dynamo recorded for a node (a FakeTensor), or None."""
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("example_value", n.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _shape(n: Any, what: str, rank: int | tuple[int, ...] | None = None) -> tuple:
    """n's recorded shape; with `rank`, NoMatch unless it has that many dims (or one of those), so
    that no caller unpacks a shape it did not check."""
    v = _val(n)
    if v is None:
        raise NoMatch(f"{what}: no recorded shape")
    shape = tuple(v.shape)
    ranks = (rank,) if isinstance(rank, int) else rank
    if ranks is not None and len(shape) not in ranks:
        want = " or ".join(f"{k}-D" for k in ranks)
        raise NoMatch(f"{what} is {len(shape)}-D {list(shape)}, expected {want}")
    return shape


def _static(x: Any, what: str) -> int:
    if isinstance(x, int):
        return x
    raise NoMatch(f"{what} is symbolic ({x}); head and rank sizes must be static")


def _same(a: Any, b: Any) -> bool:
    """Size equality that never installs a guard on a symbolic size."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if str(a) == str(b):
        return True
    try:          # e.g. s0 + 1 against 1 + s0: equal for every value, proven without a guard
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - not comparable: not the same size
        return False


def _only_users(n: fx.Node, allowed: set[fx.Node], what: str) -> None:
    extra = [u for u in n.users if u not in allowed]
    if extra and all(u.op == "output" for u in extra) and _is_probabilities(n):
        # HF's eager attention returns its probabilities. They leave the graph when the user asks
        # for them (output_attentions), or when Dynamo ended the graph inside the layer, before the
        # caller drops them (continuous batching's cache update does that).
        raise NoMatch(f"the attention probabilities ({n.name}) are an output of this graph (output_attentions, "
                      f"or eager attention's return value in a graph that ends inside the layer): no form "
                      f"computes them; attn_implementation='sdpa' returns none and is rewritten")
    if extra:
        raise NoMatch(f"{what} is also used by {', '.join(u.name for u in extra)} outside the attention core")


def _is_probabilities(n: fx.Node) -> bool:
    """n is a softmax, or one reached from it through dropout, a cast or a sink column's slice."""
    for _ in range(4):
        if _is_fn(n, F.softmax, torch.softmax) or _is_method(n, "softmax"):
            return True
        if not (_is_fn(n, F.dropout, operator.getitem) or _is_method(n, "to", "type", "type_as")):
            return False
        n = _self(n)
        if not isinstance(n, fx.Node):
            return False
    return False


def _shape_reads(x: fx.Node, consumers: set[fx.Node]) -> list[fx.Node]:
    """The `x.size()` / `x.size(d)` nodes (with the items taken of them) whose values feed only
    `consumers`. With a symbolic length HF sizes K as new_empty(B, H, x.size()[2], dn+dr): a read of
    the expansion's shape, not of its values, which goes away with the K it sizes."""
    reads = []
    for u in x.users:
        if not _is_method(u, "size"):
            continue
        leaves = [u] if len(u.args) > 1 else list(u.users)
        if len(u.args) == 1 and not all(_is_fn(g, operator.getitem) for g in leaves):
            continue
        if all(set(g.users) <= consumers for g in leaves):
            reads += [g for g in leaves if g is not u] + [u]
    return reads


def _getitem_of(n: Any, index: int) -> fx.Node:
    if not _is_fn(n, operator.getitem) or n.args[1] != index:
        raise NoMatch("expected an item of a split")
    return n.args[0]


def _slice_bounds(idx: Any, rank: int | None = None):
    """For x[..., a:b] (or, given x's rank, x[:, :, :, a:b]) return (a, b); else None."""
    if not isinstance(idx, tuple) or not idx or not isinstance(idx[-1], slice):
        return None
    lead = idx[:-1]
    full = slice(None, None, None)
    if not (lead == (Ellipsis,) or (rank is not None and len(idx) == rank and all(x == full for x in lead))):
        return None
    s = idx[-1]
    if s.step in (None, 1):
        return s.start, s.stop
    return None


# --------------------------------------------------------------------------------------------- #
# Module attribution.

_FAMILY_RE = re.compile(r"transformers\.models\.([a-z0-9_]+)\.")
_ROOT_LOCAL_RE = re.compile(r"^L\['[^']+'\](\[(\d+|'[^']+')\])*\.?")


_MODELING_FILE_RE = re.compile(r"transformers/models/([a-z0-9_]+)/modeling_")


def module_of(n: fx.Node) -> tuple[str, str | None]:
    """(qualified module name in the user's model, HF model type) from Dynamo's nn_module_stack. A
    graph whose root is the attention module itself (Dynamo resumed inside its forward after a graph
    break, as under continuous batching, where one graph then serves every layer) has no stack: the
    module is "<top>" and the family is read from the node's stack trace (HF's modeling file)."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        m = _MODELING_FILE_RE.search(str(n.meta.get("stack_trace") or "").replace("\\", "/"))
        return "<top>", (m.group(1) if m else None)
    path, cls = list(stack.values())[-1]
    # The root is the compiled frame's local that holds the model: `L['self']` for a method, or
    # `L['args'][0]` / `L['kwargs']['self']` when a decorator wraps forward in `(*args, **kwargs)`.
    path = _ROOT_LOCAL_RE.sub("", str(path))
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    mod = getattr(cls, "__module__", "") if not isinstance(cls, str) else cls
    m = _FAMILY_RE.search(str(mod) + ".")
    return path or "<top>", (m.group(1) if m else None)


# --------------------------------------------------------------------------------------------- #
# The cores.

@dataclass
class _Core:
    kind: str
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float | None
    is_causal: bool
    nodes: list[fx.Node]         # the core's own nodes, erased after the rewrite
    k_uses: set[fx.Node]          # the core nodes that read K
    sinks: fx.Node | None = None  # the [H] sink logits of a sink softmax


def _eager_core(out: fx.Node) -> _Core:
    """out = matmul(dropout(to(softmax(add(mul(matmul(Q, K^T), s), mask)))), V), the softmax possibly
    one with attention sinks (passes/sinks.py: softmax(cat([scores, sinks]))[..., :-1])."""
    from mla_compile.passes.sinks import is_sink_probabilities, match_sink_softmax

    p, v = out.args[0], out.args[1]
    nodes = [out]
    for _ in range(2):          # dropout and the cast to V's dtype, in either order
        if _is_fn(p, F.dropout):
            if _arg(p, 0, "p", 0.5) != 0.0 and _arg(p, 1, "training", True):
                raise NoMatch("attention dropout is active (training with dropout > 0)")
            nodes.append(p)
            p = _self(p)
        elif _is_method(p, "to", "type", "type_as"):
            nodes.append(p)
            p = _self(p)
    sinks = None
    if is_sink_probabilities(p):
        sink = match_sink_softmax(p)
        nodes += sink.nodes
        sinks, x = sink.sinks, sink.scores
    else:
        if not (_is_fn(p, F.softmax, torch.softmax) or _is_method(p, "softmax")):
            raise NoMatch("no softmax before P @ V")
        if _arg(p, 0, "dim", None) not in (-1, 3):
            raise NoMatch("softmax is not over the key dimension")
        nodes.append(p)
        x = _self(p)
    mask = None
    if _is_fn(x, operator.add, torch.add):
        if len(x.args) > 2 or x.kwargs:
            raise NoMatch("the mask is added with a factor (alpha) or an out= tensor")
        mask = x.args[1]
        nodes.append(x)
        x = x.args[0]
        if not isinstance(mask, fx.Node):
            raise NoMatch("the added mask is not a tensor")
        mv = _val(mask)
        if mv is not None and not mv.dtype.is_floating_point:
            # the forms read a bool mask as "attend here"; added to scores, a bool adds 0 or 1
            raise NoMatch("the mask added to the scores is not a float tensor")
    scale = 1.0
    if _is_fn(x, operator.mul, torch.mul) and isinstance(x.args[1], (int, float)):
        scale = float(x.args[1])
        nodes.append(x)
        x = x.args[0]
    elif _is_fn(x, operator.truediv) and isinstance(x.args[1], (int, float)):
        scale = 1.0 / float(x.args[1])
        nodes.append(x)
        x = x.args[0]
    if not _is_fn(x, torch.matmul):
        raise NoMatch("no Q @ K^T product before the softmax")
    nodes.append(x)
    q, kt = x.args[0], x.args[1]
    if not _swaps_last_two(kt):
        raise NoMatch("the key is not transposed into Q @ K^T")
    nodes.append(kt)
    for n in nodes[1:]:
        _only_users(n, set(nodes), f"the attention core value {n.name}")
    return _Core("eager", out, q, _self(kt), v, mask, scale, False, nodes, {kt}, sinks)


def _swaps_last_two(kt: Any) -> bool:
    """kt is K^T of a 4-D K: transpose(2, 3) / (-2, -1) in either order, or permute(0, 1, 3, 2)."""
    if _is_method(kt, "transpose") or _is_fn(kt, torch.transpose):
        dims = kt.args[1:3]
        return len(dims) == 2 and all(isinstance(d, int) for d in dims) and sorted(d % 4 for d in dims) == [2, 3]
    if _is_method(kt, "permute"):
        dims = kt.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return all(isinstance(d, int) for d in dims) and [d % 4 for d in dims] == [0, 1, 3, 2]
    return False


def _sdpa_core(out: fx.Node) -> _Core:
    q = out.args[0] if out.args else out.kwargs.get("query")
    k, v = _arg(out, 0, "key"), _arg(out, 1, "value")
    mask = _arg(out, 2, "attn_mask")
    if _arg(out, 3, "dropout_p", 0.0) not in (0, 0.0):
        raise NoMatch("SDPA dropout is active")
    is_causal = bool(_arg(out, 4, "is_causal", False))
    scale = _arg(out, 5, "scale")
    if out.kwargs.get("enable_gqa"):
        raise NoMatch("SDPA grouped-query broadcasting is on")
    if scale is not None and not isinstance(scale, (int, float)):
        raise NoMatch("SDPA scale is a tensor")
    return _Core("sdpa", out, q, k, v, mask, None if scale is None else float(scale), is_causal, [out], {out})


# --------------------------------------------------------------------------------------------- #
# Tracing the operands back to the latent.

@dataclass
class _Expansion:
    latent: fx.Node
    weight: fx.Node
    x: fx.Node                 # the [B, H, T, dn+dv] expansion
    split: fx.Node
    nodes: list[fx.Node]       # linear, view, transpose, split and its items


def _expansion_of_value(v: fx.Node) -> tuple[_Expansion, int, int]:
    if _is_fn(v, torch.cat) and any(_is_fn(p, operator.getitem) for p in v.args[0]):
        raise NoMatch("V is a cache of expanded values (cat of cached and new V): the cache holds no latent "
                      "to attend over (transformers before 5.18 caches expanded K/V for DSA models)")
    split = _getitem_of(v, 1)
    if not _is_fn(split, torch.split, torch.functional.split) and not _is_method(split, "split"):
        raise NoMatch("V is not the second half of a split")
    sizes = _arg(split, 0, "split_size_or_sections")
    dim = _arg(split, 1, "dim", 0)
    if not (isinstance(sizes, (list, tuple)) and len(sizes) == 2 and dim in (-1, 3)):
        raise NoMatch("V's split is not [dn, dv] over the last dim")
    dn, dv = (_static(s, "split size") for s in sizes)
    x = _self(split)
    if not (_is_method(x, "transpose") and sorted(x.args[1:3]) == [1, 2]):
        raise NoMatch("the expansion is not transposed to [B, H, T, d]")
    view = _self(x)
    if not _is_method(view, "view", "reshape"):
        raise NoMatch("the expansion is not viewed per head")
    lin = _self(view)
    if not _is_fn(lin, F.linear, torch._C._nn.linear):
        raise NoMatch("K/V do not come from a linear layer (no latent expansion)")
    if len(lin.args) > 2 and lin.args[2] is not None or lin.kwargs.get("bias") is not None:
        raise NoMatch("the expansion has a bias (kv_b_proj with bias is not absorbed)")
    latent, weight = lin.args[0], lin.args[1]
    nodes = [lin, view, x, split]
    return _Expansion(latent, weight, x, split, nodes), dn, dv


def _key_assembly(k: fx.Node, exp: _Expansion, dn: int, core: _Core) -> tuple[fx.Node, fx.Node | None, list[fx.Node]]:
    """K = new_empty(B, H, T, dn+dr) filled in two pieces, each either HF's
    `K[..., :dn].copy_(k_nope)` or an assignment `K[..., :dn] = k_nope` (FlashInfer's reference):
    [:dn] from the first half of V's split, [dn:] from the shared RoPE key, broadcast over heads by
    `kp.expand(-1, H, -1, -1)` or by the write itself. Returns (kp, the expand or None, nodes to erase).
    Both writes must come before the core reads K: a write after it (through a view taken earlier)
    would change what the core saw."""
    if _is_fn(k, torch.cat):
        # K = cat([k_nope, kp.expand(-1, H, -1, -1)], -1), as DeepSeek's own code writes it
        parts, dim = k.args[0], _arg(k, 0, "dim", 0)
        if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (-1, 3)):
            raise NoMatch("K is a cat of other than [k_nope, RoPE key] over the last dim")
        nope_src, rope_src = parts
        extra = [u for u in k.users if u not in core.k_uses]
        if extra:
            raise NoMatch(f"K is used by {extra[0].name} outside the attention core")
        if _getitem_of(nope_src, 0) is not exp.split:
            raise NoMatch("K's no-RoPE part is not the first half of V's split")
        if not _is_method(rope_src, "expand"):
            raise NoMatch("K's RoPE part is not the shared key broadcast over heads")
        return _self(rope_src), rope_src, [k, nope_src, rope_src]
    if not _is_method(k, "new_empty"):
        raise NoMatch("K is not assembled from the expansion (no new_empty + copy_, no cat)")
    nope_src = rope_src = None
    nodes = [k]
    writes = []
    for u in list(k.users):
        if u in core.k_uses:
            continue
        if _is_fn(u, operator.setitem) and u.args[0] is k and len(u.args) == 3:
            bounds, src, write = _slice_bounds(u.args[1], 4), u.args[2], u
            nodes.append(u)
        else:
            bounds = _slice_bounds(u.args[1], 4) if _is_fn(u, operator.getitem) else None
            copies = [c for c in u.users if _is_method(c, "copy_") and c.args[0] is u]
            if bounds is None or len(copies) != 1 or len(u.users) != 1:
                raise NoMatch(f"K is used by {u.name} outside the attention core")
            src, write = copies[0].args[1], copies[0]
            nodes += [u, write]
        writes.append(write)
        if bounds in ((None, dn), (0, dn)) and nope_src is None:
            nope_src = src
        elif bounds == (dn, None) and rope_src is None:
            rope_src = src
        else:
            raise NoMatch("K is filled in pieces other than one [:dn] and one [dn:]")
    if nope_src is None or rope_src is None:
        raise NoMatch("K is not filled from both k_nope and the RoPE key")
    first_read = min(core.k_uses, key=_position)
    if any(_position(w) > _position(first_read) for w in writes):
        raise NoMatch("K is written after the attention core reads it")
    if _getitem_of(nope_src, 0) is not exp.split:
        raise NoMatch("K's no-RoPE part is not the first half of V's split")
    nodes.append(nope_src)
    if _is_method(rope_src, "expand"):
        nodes.append(rope_src)
        return _self(rope_src), rope_src, nodes
    if not isinstance(rope_src, fx.Node):
        raise NoMatch("K's RoPE part is not a tensor")
    return rope_src, None, nodes      # broadcast by the write itself: _match_core checks [B, 1, T, dr]


def _position(n: fx.Node) -> int:
    """n's index in its graph's node order (the order the graph runs in)."""
    for i, m in enumerate(n.graph.nodes):
        if m is n:
            return i
    raise NoMatch(f"{n.name} is not in the graph")


def _query_parts(q: fx.Node, dn: int, dr: int) -> tuple[fx.Node | None, fx.Node | None]:
    """(q_nope, q_rope) when Q is cat(q_nope, q_rope) over the last dim with those widths, else
    (None, None): the rewrite then slices Q itself (families that scale Q after the cat, such as
    mistral4's per-position llama-4 scale, or never split it, such as kimi_linear)."""
    if not _is_fn(q, torch.cat):
        return None, None
    parts = q.args[0]
    dim = _arg(q, 0, "dim", 0)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (-1, 3)):
        return None, None
    widths = [_val(p).shape[-1] if _val(p) is not None else None for p in parts]
    if widths != [dn, dr]:
        return None, None
    return parts[0], parts[1]


def _static_cache_position(latent: fx.Node) -> fx.Node | None:
    """A StaticCache writes the new latents in place, `cache.index_copy_(2, cache_position, new)`, and
    attention then reads the whole preallocated buffer. The positions written tell how much of it is
    filled (HF fills it from the front), so the kernels can skip the rest."""
    v = _val(latent)
    if v is None or v.dim() != 4:        # HF's StaticCache layout [B, 1, T, r]: dim 2 is the tokens
        return None
    writes = [u for u in latent.users if _is_method(u, "index_copy_") and u.args[0] is latent
              and _arg(u, 0, "dim") in (2, -2)]
    if len(writes) != 1:
        return None
    pos = _arg(writes[0], 1, "index")
    v = _val(pos)
    return pos if v is not None and v.dim() == 1 and not v.is_floating_point() else None


def _dsa_mask(mask: fx.Node | None):
    """If mask is HF's DSA top-k masking of a base mask, return (base, indices, index-mask nodes)."""
    if mask is None:
        return None
    if _is_method(mask, "masked_fill"):
        base, index_mask = _self(mask), _arg(mask, 0, "mask")
    elif _is_fn(mask, operator.and_, torch.logical_and) and _is_fn(mask.args[1], operator.invert, torch.logical_not):
        base, index_mask = mask.args[0], mask.args[1].args[0]
    else:
        return None
    if not (_is_method(index_mask, "unsqueeze") and _arg(index_mask, 0, "dim") == 1):
        return None
    scatter = _self(index_mask)
    if not (_is_method(scatter, "scatter") and _arg(scatter, 0, "dim") in (-1, 2)
            and _arg(scatter, 2, "value") is False and _is_method(_self(scatter), "new_ones")):
        return None
    idx = _arg(scatter, 1, "index")
    if _is_method(idx, "long", "to"):
        idx = _self(idx)
    nodes = [mask, index_mask, scatter, _self(scatter)]
    if mask.op == "call_function":
        nodes.insert(1, mask.args[1])
    return base, idx, nodes


# --------------------------------------------------------------------------------------------- #

def _latent_dims(latent: fx.Node) -> tuple[Any, Any, int]:
    """(B, T, r) of a latent laid out [B, 1, T, r] (HF's one-head cache) or [B, T, r] (a plain
    token-major cache, as DeepSeek's and FlashInfer's references keep it); the ops take either."""
    shape = _shape(latent, "latent", (3, 4))
    if len(shape) == 4:
        B, one, T, r = shape
        if not _same(one, 1):
            raise NoMatch(f"the latent has {one} heads, expected one shared head")
    else:
        B, T, r = shape
    return B, T, _static(r, "kv_lora_rank")


def _match_core(core: _Core) -> Region:
    exp, dn, dv = _expansion_of_value(core.v)
    kp, kp_expand, key_nodes = _key_assembly(core.k, exp, dn, core)

    B, T, r = _latent_dims(exp.latent)
    w_rows, w_r = (_static(s, "kv_b_proj weight dim") for s in _shape(exp.weight, "kv_b_proj weight", 2))
    if w_r != r or w_rows % (dn + dv):
        raise NoMatch(f"kv_b_proj weight {w_rows}x{w_r} does not fit latent rank {r} and head dims {dn}+{dv}")
    H = w_rows // (dn + dv)
    kpb, kph, kpt, kpdr = _shape(kp, "RoPE key", 4)
    dr = _static(kpdr, "qk_rope_head_dim")
    qb, qh, S, qd = _shape(core.q, "Q", 4)
    if not (_same(qh, H) and _same(qd, dn + dr)):
        raise NoMatch(f"Q is {_shape(core.q, 'Q')}, expected [B, H={H}, S, dn+dr={dn + dr}]")
    q_nope, q_rope = _query_parts(core.q, dn, dr)
    if not (_same(kph, 1) and _same(kpdr, dr) and _same(kpt, T) and _same(kpb, B) and _same(qb, B)):
        raise NoMatch("the RoPE key is not one shared [B, 1, T, dr] head")
    # A view is a row-major reinterpretation, so its output shape alone fixes what it does: the
    # linear's [B, (1,) T, H*(dn+dv)] read as [B, T, H, dn+dv] splits the last dim into heads and
    # nothing else. Any other leading order (say [T, B, ...]) would mix tokens and rows.
    view_shape = _shape(_self(exp.x), "the expansion's view", 4)
    if not (_same(view_shape[0], B) and _same(view_shape[1], T) and _same(view_shape[2], H)
            and _same(view_shape[3], dn + dv)):
        raise NoMatch(f"the expansion is viewed as {list(view_shape)}, not [B, T, H={H}, dn+dv={dn + dv}]")
    # K must be exactly [B, H, T, dn+dr] and its RoPE part the shared key broadcast to [B, H, T, dr]:
    # copy_ broadcasts its source, so a K of another shape could be filled without an error.
    kshape = _shape(core.k, "K", 4)
    if not (_same(kshape[0], B) and _same(kshape[1], H) and _same(kshape[2], T) and _same(kshape[3], dn + dr)):
        raise NoMatch(f"K is {list(kshape)}, expected [B, H={H}, T, dn+dr={dn + dr}]")
    if kp_expand is not None:
        eshape = _shape(kp_expand, "the broadcast RoPE key", 4)
        if not (_same(eshape[0], B) and _same(eshape[1], H) and _same(eshape[2], T) and _same(eshape[3], dr)):
            raise NoMatch(f"the RoPE key is broadcast to {list(eshape)}, expected [B, H={H}, T, dr={dr}]")
    dtype = _val(core.output).dtype if _val(core.output) is not None else torch.float32

    # What the core reads must be used only by it (else it cannot be removed); Q may be read elsewhere.
    _only_users(core.v, set(core.nodes), "V")
    shape_reads = _shape_reads(exp.x, {core.k})
    _only_users(exp.x, {exp.split, core.k, *shape_reads}, "the expansion")

    scale = core.scale
    if scale is None:   # SDPA's default scale
        scale = (dn + dr) ** -0.5

    mask, base_mask, idx, topk, dead_mask, layout = core.mask, None, None, None, [], None
    dsa = _dsa_mask(core.mask)
    if dsa is not None:
        base_mask, idx, dead_mask = dsa
        topk = _shape(idx, "top-k indices", 3)[2]
    elif core.mask is not None:
        # a dense top-k index mask in another spelling (-inf, zeros scattered at the top-k): where it
        # is not proven exactly, the region stays dense over the mask as written
        from mla_compile.passes.contraction import index_mask
        try:
            im = index_mask(core.mask, "BHST", dict(B=B, H=H, S=S, T=T))
        except NoMatch:
            im = None
        if im is not None:
            dsa = True
            base_mask, idx, topk, dead_mask = im.base, im.indices, im.k, im.nodes + im.loose
            layout = dict(topk_indices=im.roles, base_mask=im.base_view)
    module, family = module_of(core.output)
    dead = core.nodes + key_nodes + shape_reads + [core.v] + exp.nodes[::-1] + (dead_mask if dsa else [])
    if q_nope is not None:
        dead.append(core.q)
    return Region(
        module=module, family=family, core=core.kind, output=core.output, query=core.q, q_nope=q_nope, q_rope=q_rope,
        latent=exp.latent, k_rope=kp, weight=exp.weight, mask=mask, base_mask=base_mask,
        topk_indices=idx, topk=topk, scale=float(scale), is_causal=core.is_causal,
        cache_position=_static_cache_position(exp.latent),
        dims=dict(B=B, H=H, S=S, T=T, r=r, dr=dr, dn=dn, dv=dv, k=topk), dtype=dtype,
        dead=[n for n in dead if isinstance(n, fx.Node)], layout=layout, sinks=core.sinks,
    )


def find_regions(gm: fx.GraphModule) -> tuple[list[Region], list[Miss]]:
    """Every MLA attention region in the graph, and every attention core that was not one."""
    regions, misses = [], []
    for n in list(gm.graph.nodes):
        try:
            _match_anchor(n, regions, misses)
        except Exception as e:  # noqa: BLE001 - even the anchor tests must never stop compilation
            try:
                module, family = module_of(n)
            except Exception:  # noqa: BLE001
                module, family = "<top>", None
            misses.append(Miss(module, family, getattr(n.target, "__name__", str(n.target)), f"not matched (the matcher stopped on "
                                                    f"{type(e).__name__}: {e}); left as written"))
    for note in (_scores_cut_by_graph_break, _attention_cut_by_dynamic_shape_op):
        try:
            misses += note(gm)
        except Exception:  # noqa: BLE001 - a note for the log only; never stops compilation
            pass
    return regions, misses


_LATENT_PROJECTIONS = ("kv_a_proj", "kv_b_proj", "wkv_a", "wkv_b")   # HF's and DeepSeek's names


def _attention_cut_by_dynamic_shape_op(gm: fx.GraphModule) -> list[Miss]:
    """A graph that holds an MLA layer's latent projections and that Dynamo ended at an operator whose
    output shape depends on data (`nonzero`, boolean indexing: glm5_next's indexer): the attention
    continues in other graphs and is left as written. Dynamo keeps such operators in the graph only
    under `torch._dynamo.config.capture_dynamic_output_shape_ops`, which loading the backend turns on
    unless the user has set it (`backend.capture_data_dependent_shapes`); a user who turned it off
    gets this miss, which names the setting.
    Which graph holds the layer is read from module names, for this note only."""
    why = getattr(gm, "compile_subgraph_reason", None)
    if why is None or not getattr(why, "graph_break", False):
        return []
    text = str(why.reason)
    if "capture_dynamic_output_shape_ops" not in text:
        return []
    owners = [module_of(n) for n in gm.graph.nodes]
    if not any(any(p in module.rsplit(".", 1)[-1] for p in _LATENT_PROJECTIONS) for module, _ in owners):
        return []
    family = next((fam for _, fam in owners if fam is not None), None)
    frame = why.user_stack[-1] if getattr(why, "user_stack", None) else None
    where = (f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} `{(frame.line or '').strip()}`"
             if frame is not None else "")
    op = re.search(r"Operator `([^`]+)`", text)
    return [Miss("<top>", family, "graph break",
                 f"Dynamo broke this attention's graph{where} ({op.group(1) if op else 'an operator'} has a "
                 f"data-dependent output shape), so no graph holds the whole attention and it runs as written: "
                 f"set torch._dynamo.config.capture_dynamic_output_shape_ops = True before compiling")]


def _scores_cut_by_graph_break(gm: fx.GraphModule) -> list[Miss]:
    """Attention scores (a scaled sum of products) that are an output of a graph Dynamo ended at a
    graph break: the softmax and P @ V are in the next graph, so no graph holds the attention. The
    miss names the break, as Dynamo recorded it, and what removes it where the break is an assert."""
    from mla_compile.passes import contraction

    why = getattr(gm, "compile_subgraph_reason", None)
    if why is None or not getattr(why, "graph_break", False):
        return []
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return []
    flat = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]

    def products(x):            # the products of a scaled sum (none of them P @ V: P comes from a softmax)
        while _is_fn(x, operator.mul, torch.mul, operator.truediv, torch.div) and len(x.args) == 2:
            x = x.args[0] if isinstance(x.args[1], (int, float)) else x.args[1]
        return list(x.args) if _is_fn(x, operator.add, torch.add) else [x]

    scores = [x for x in flat if isinstance(x, fx.Node) and _val(x) is not None and _val(x).dim() == 4
              and contraction._is_scaled_sum(x)
              and all(contraction.softmax_operand(p) is None for p in products(x))]
    if not scores:
        return []
    frame = why.user_stack[-1] if getattr(why, "user_stack", None) else None
    where = (f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} `{(frame.line or '').strip()}`"
             if frame is not None else "")
    cause = str(why.reason).strip().splitlines()[0] if str(why.reason).strip() else "a graph break"
    reason = (f"attention scores ({', '.join(x.name for x in scores)}) leave this graph at a graph break before "
              f"the softmax, so no graph holds the whole attention: Dynamo broke the graph{where} ({cause})")
    if frame is not None and (frame.line or "").lstrip().startswith("assert "):
        reason += (". Dynamo turns an assert on a tensor into torch._assert_async only when its message is a "
                   "constant string, and no torch._dynamo.config setting changes that: run Python with -O "
                   "(PYTHONOPTIMIZE=1), which compiles asserts out, and the attention is one graph")
    out_misses = []
    for x in scores:
        module, family = module_of(x)
        out_misses.append(Miss(module, family, getattr(x.target, "__name__", "product"), reason))
    return out_misses[:1]


def _match_anchor(n: fx.Node, regions: list[Region], misses: list[Miss]) -> None:
    """Match one candidate anchor node, appending to regions or misses (nothing for a non-anchor)."""
    from mla_compile.passes import contraction

    if _is_fn(n, SDPA):
        kind, build = "sdpa", _sdpa_core
    elif _is_fn(n, torch.matmul) and _is_softmax_product(n):
        kind, build = "eager", _eager_core
    elif _is_fn(n, torch.matmul) and _reads_expanded_value(n):
        module, family = module_of(n)
        misses.append(Miss(module, family, "eager", _unrecognised_probabilities(n.args[0])))
        return
    elif contraction.is_product(n) and contraction.softmax_operand(n) is not None:
        # P @ V spelled otherwise (einsum, bmm, `@`, P on the right): only the absorbed reading applies
        module, family = module_of(n)
        op = getattr(n.target, "__name__", "product")
        try:
            regions.append(contraction.match_absorbed(n))
        except NoMatch as e:
            misses.append(Miss(module, family, op, f"attention written as products ({op}), not taken: {e}"))
        return
    else:
        return
    module, family = module_of(n)
    core = None
    try:
        from mla_compile.passes.shared_kv import match_shared_kv, shares_one_head

        core = build(n)
        regions.append(match_shared_kv(core) if shares_one_head(core) else _match_core(core))
    except NoMatch as e:
        region = None
        if kind == "eager":
            # HF's layout failed; the same core may still be an absorbed MLA written with matmul
            try:
                region = contraction.match_absorbed(n)
            except NoMatch:
                pass
        if region is not None:
            regions.append(region)
        else:
            misses.append(Miss(module, family, kind, _plain_reason(core, e, n, kind)))
    except Exception as e:  # noqa: BLE001 - a shape the matcher did not foresee: leave it as written
        misses.append(Miss(module, family, kind, f"not matched (the matcher stopped on "
                                                 f"{type(e).__name__}: {e}); left as written"))


def _plain_reason(core: "_Core | None", e: NoMatch, n: fx.Node, kind: str) -> str:
    """Why an attention core was not taken, in the reader's words: "no MLA here" where its values are
    not expanded from one shared latent (what kv_b_proj does), the matcher's detail after it. Where the
    core could not be built, its value is read off the last product (P @ V, or SDPA's third argument)."""
    from mla_compile.passes.shared_kv import shares_one_head

    if core is not None and shares_one_head(core):
        return f"attention over one shared key/value head (latent MQA), not taken: {e}"
    latent_values = False
    v = core.v if core is not None else (n.args[1] if kind == "eager" else _arg(n, 1, "value"))
    if isinstance(v, fx.Node):
        try:
            _expansion_of_value(v)
            latent_values = True
        except NoMatch:
            pass
        except Exception:  # noqa: BLE001 - an unforeseen shape: not a latent expansion we know
            pass
    if not latent_values:
        return f"no MLA here: the values are not expanded from a shared latent by a kv_b_proj-style projection ({e})"
    return f"MLA attention, not taken: {e}"


def _is_softmax_product(n: fx.Node) -> bool:
    """matmul(P, V) whose P comes (through dropout/to) from a softmax: an attention core's last product."""
    from mla_compile.passes.sinks import is_sink_probabilities

    p = n.args[0]
    for _ in range(3):
        if _is_fn(p, F.softmax, torch.softmax) or _is_method(p, "softmax") or is_sink_probabilities(p):
            return True
        if not (_is_fn(p, F.dropout) or _is_method(p, "to", "type", "type_as")):
            return False
        p = _self(p)
    return False


def _reads_expanded_value(n: fx.Node) -> bool:
    """P @ V where V is a latent expansion, but P is not a plain softmax (a near-miss worth logging)."""
    try:
        _expansion_of_value(n.args[1])
        return True
    except NoMatch:
        return False


def _unrecognised_probabilities(p: Any) -> str:
    return "P @ V reads a latent expansion, but P is not softmax(Q K^T * scale + mask) (with or without sinks)"
