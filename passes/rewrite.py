"""Replace a matched MLA region by one call of the chosen form's op.

Inserted just before the core's output:

    w      = kv_b_weight.view(H, dn + dv, r)        # views, no copy: W_UK = w[:, :dn], W_UV = w[:, dn:]
    out    = torch.ops.mla.<form>(q_nope, q_rope, latent, k_rope, W_UK, W_UV, [indices,] mask, scale, is_causal)

then the core, HF's key assembly (new_empty + copy_), the expansion and (for the sparse forms) the
dense top-k mask are erased once nothing reads them. A region found already absorbed names its own
W_UK / W_UV and may keep its operands in another layout ([B, S, H, *], DeepSeek's): each goes
through the permute its `layout` gives, and the op's output is permuted back. The weight views are graph nodes over the
weight placeholder, so Inductor folds them and training sees the real parameter.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from mla_compile.passes.forms import SPARSE_FORMS, op_for
from mla_compile.passes.match import Region


def rewrite(gm: fx.GraphModule, region: Region, form: str, dense_mask: str = "full", plan_id: int | None = None) -> fx.Node:
    """Emit `form` for `region`. dense_mask="base" lets a dense form of a DSA region drop the
    top-k mask (exact only when every key is selected, i.e. T <= k). form="auto" emits the run-time
    dispatching op with plan `plan_id`."""
    g = gm.graph
    if region.shared_kv:
        return _rewrite_shared_kv(g, region, form)
    d = region.dims
    H, dn, dv, r = d["H"], d["dn"], d["dv"], d["r"]
    layout = region.layout or {}
    inserted = []

    def arranged(node, name):
        """node permuted into the op's layout for argument `name` (no node when it already is)."""
        perm = layout.get(name)
        if perm is None or tuple(perm) == tuple(range(len(perm))):
            return node
        inserted.append(g.call_method("permute", (node, *perm)))
        return inserted[-1]

    with g.inserting_before(region.output):
        if region.w_uk is not None:
            w_uk, w_uv = arranged(region.w_uk, "w_uk"), arranged(region.w_uv, "w_uv")
        else:
            w = g.call_method("view", (region.weight, H, dn + dv, r))
            w_uk = g.call_function(operator.getitem, (w, (slice(None), slice(None, dn))))
            w_uv = g.call_function(operator.getitem, (w, (slice(None), slice(dn, None))))
            inserted += [w, w_uk, w_uv]
        q_nope, q_rope = region.q_nope, region.q_rope
        if q_nope is None:
            query = arranged(region.query, "query")          # [B, H, S, dn+dr]
            q_nope = g.call_function(operator.getitem, (query, (Ellipsis, slice(None, dn))))
            q_rope = g.call_function(operator.getitem, (query, (Ellipsis, slice(dn, None))))
            inserted += [q_nope, q_rope]
        q_nope, q_rope = arranged(q_nope, "q_nope"), arranged(q_rope, "q_rope")
        head = (q_nope, q_rope, arranged(region.latent, "latent"), arranged(region.k_rope, "k_rope"), w_uk, w_uv)

        def as_scores_mask(mask, ups=()):
            """The mask as the region's scores saw it (4-D, in their axis order), then in [B, 1, S, T];
            `ups`: the unsqueezes that took it there first (a DSA base mask under a top-k index mask)."""
            if mask is None:
                return None
            for d in ups:
                inserted.append(g.call_method("unsqueeze", (mask, d)))
                mask = inserted[-1]
            if layout.get("mask") is not None:
                lead, perm = layout["mask"]
                for _ in range(lead):
                    inserted.append(g.call_method("unsqueeze", (mask, 0)))
                    mask = inserted[-1]
                if tuple(perm) != (0, 1, 2, 3):
                    inserted.append(g.call_method("permute", (mask, *perm)))
                    mask = inserted[-1]
            return mask

        mask = as_scores_mask(region.mask)
        sinks = (region.sinks,) if region.sinks is not None else ()    # the ops' last argument
        base_mask, indices = region.base_mask, region.topk_indices
        if layout.get("base_mask") is not None and base_mask is not None and (form == "auto" or form in SPARSE_FORMS
                                                                               or dense_mask == "base"):
            lead, ups = layout["base_mask"]
            base_mask = as_scores_mask(base_mask, (0,) * lead + tuple(ups))
        if layout.get("topk_indices") is not None and (form == "auto" or form in SPARSE_FORMS):
            indices = _indices_bsk(g, indices, layout["topk_indices"], q_nope, d, inserted)
        if form == "auto":
            mask = base_mask if region.is_sparse else mask
            new = g.call_function(torch.ops.mla.auto.default,
                                  head + (indices, mask, region.scale, region.is_causal, plan_id) + sinks)
        elif form in SPARSE_FORMS:
            new = g.call_function(op_for(form), head + (indices, base_mask, region.scale, region.is_causal) + sinks)
        else:
            mask = base_mask if (region.is_sparse and dense_mask == "base") else mask
            new = g.call_function(op_for(form), head + (mask, region.scale, region.is_causal, _filled(g, region))
                                  + sinks)
    if layout.get("output") is not None and tuple(layout["output"]) != tuple(range(4)):
        with g.inserting_before(region.output):
            inserted.append(new)
            new = g.call_method("permute", (new, *layout["output"]))
    return _install(g, region, new, inserted)


def _install(g: fx.Graph, region: Region, new: fx.Node, inserted: list[fx.Node]) -> fx.Node:
    """`new` takes the core output's place (its users, its module and example value); the region's old
    nodes go."""
    for n in inserted + [new]:
        n.meta["nn_module_stack"] = region.output.meta.get("nn_module_stack", {})
    if region.output.meta.get("example_value") is not None:
        new.meta["example_value"] = region.output.meta["example_value"]
    region.output.replace_all_uses_with(new)
    _erase_dead(g, region.dead)
    return new


def _rewrite_shared_kv(g: fx.Graph, region: Region, form: str = "latent_mqa") -> fx.Node:
    """out = mla.latent_mqa(Q, kv, mask, scale, is_causal[, sinks]) in place of the core and the repeats;
    DeepSeek-V4's CSA: mla.latent_mqa_gathered(Q, kv, window_mask, picks, scale[, sinks]), and HF's
    dense top-k bias goes once nothing reads it."""
    sinks = (region.sinks,) if region.sinks is not None else ()
    with g.inserting_before(region.output):
        if form == "latent_mqa_gathered":
            picks, inserted = region.topk_indices, []
            limit = (region.layout or {}).get("picks_below")
            if limit is not None:     # picks not provably below C: those at or past it dropped, as HF drops C
                inserted.append(g.call_function(operator.lt, (picks, limit)))
                inserted.append(g.call_function(torch.where, (inserted[-1], picks, -1)))
                picks = inserted[-1]
            new = g.call_function(torch.ops.mla.latent_mqa_gathered.default,
                                  (region.query, region.latent, region.base_mask, picks, region.scale) + sinks)
            return _install(g, region, new, inserted)
        else:
            new = g.call_function(torch.ops.mla.latent_mqa.default,
                                  (region.query, region.latent, region.mask, region.scale, region.is_causal) + sinks)
    return _install(g, region, new, [])


def _indices_bsk(g: fx.Graph, idx: fx.Node, roles: str, q_nope: fx.Node, d: dict, inserted: list) -> fx.Node:
    """Top-k indices whose axes have `roles` (B, S, unit axes, "K" the selection) as the ops take
    them, [B, S, k]: unit axes dropped, missing batch or query axes added, permuted, and broadcast
    (a view) where one selection serves every batch row or query."""
    for i in reversed(range(len(roles))):
        if roles[i] not in "BSK":
            inserted.append(g.call_method("squeeze", (idx, i)))
            idx, roles = inserted[-1], roles[:i] + roles[i + 1:]
    for r in "SB":
        if r not in roles:
            inserted.append(g.call_method("unsqueeze", (idx, 0)))
            idx, roles = inserted[-1], r + roles
    perm = tuple(roles.index(r) for r in "BSK")
    if perm != (0, 1, 2):
        inserted.append(g.call_method("permute", (idx, *perm)))
        idx = inserted[-1]
    sizes = []
    for key, axis in (("B", 0), ("S", 2)):
        if isinstance(d[key], int):
            sizes.append(d[key])
        else:               # a dynamic size: read off q_nope [B, H, S, dn] at run time
            inserted.append(g.call_method("size", (q_nope, axis)))
            sizes.append(inserted[-1])
    inserted.append(g.call_method("expand", (idx, *sizes, -1)))
    return inserted[-1]


def _filled(g: fx.Graph, region: Region):
    """kv_lens for a static cache: last written position + 1 (a device scalar, no host read)."""
    if region.cache_position is None:
        return None
    last = g.call_function(operator.getitem, (region.cache_position, -1))
    return g.call_function(operator.add, (last, 1))


def _writes_to(n: fx.Node) -> fx.Node | None:
    """The tensor n writes in place (setitem, x.op_(...)), else None."""
    if n.op == "call_function" and n.target is operator.setitem:
        return n.args[0]
    if n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__"):
        return n.args[0]
    return None


def _erase_dead(g: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the region's old nodes as they become unread (copy_ is impure, so DCE would keep it).
    A write whose result nobody reads (setitem, a statement `m.scatter_(...)`) goes only once nothing
    but such writes reads the tensor it writes: while the op still reads that tensor, it stays."""
    pending = list(dict.fromkeys(nodes))

    def unread(n: fx.Node) -> bool:
        if n.users:
            return False
        target = _writes_to(n)
        if not isinstance(target, fx.Node):
            return True
        return all(not u.users and _writes_to(u) is target for u in target.users)

    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if unread(n):
                g.erase_node(n)
                pending.remove(n)
                changed = True
    # Nodes still read elsewhere (e.g. a mask also used by the indexer) stay, as they must.
