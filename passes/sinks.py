"""Attention sinks in a graph: the softmax over [scores, one logit per head] with the sink's column
dropped, as HF writes it for HY-V4 (and DeepSeek-V4):

    sink   = sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)       sinks: [H], one logit per head
    logits = cat([scores, sink], dim=-1)                            [B, H, S, T + 1]
    logits = logits - logits.max(dim=-1, keepdim=True).values       (optional: the row max, shifted out)
    P      = softmax(logits, dim=-1)[..., :-1]                      [B, H, S, T]

P is then exactly what the forms compute with `sinks` (kernels.common: the sink joins the
normaliser as a key with a zero value, never masked): the mask was added to the scores before the
cat, so it never reaches the sink; subtracting the row max changes no probability. Each step below is
proven on the graph (the index, the axes, the shapes, the source of the sink column); a graph that
looks like a sink softmax but fails a step is a near miss whose reason names the step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F


@dataclass
class SinkSoftmax:
    scores: fx.Node             # the masked, scaled scores [B, H, S, T] (cat's first operand)
    sinks: fx.Node              # the [H] sink logits
    nodes: list[fx.Node]        # P's slice back to the cat, and the sink column's reshape/expand


def is_sink_probabilities(p: Any) -> bool:
    """Whether p is a slice of a softmax (the shape of a sink softmax, before any proof)."""
    from mla_compile.passes.match import _is_fn, _is_method

    return _is_fn(p, operator.getitem) and (
        _is_fn(p.args[0], F.softmax, torch.softmax) or _is_method(p.args[0], "softmax"))


def match_sink_softmax(p: fx.Node) -> SinkSoftmax:
    """Prove p = softmax(cat([scores, sink column]) [- row max], -1)[..., :-1]; NoMatch names the step
    that fails."""
    from mla_compile.passes.match import NoMatch, _arg, _is_fn, _is_method, _same, _self, _val

    sm = p.args[0]
    pv, smv = _val(p), _val(sm)
    if pv is None or smv is None or pv.dim() != 4 or smv.dim() != 4:
        raise NoMatch("the sliced softmax is not 4-D [B, H, S, T + 1]")
    if not _drops_last_column(p.args[1], smv.dim()):
        raise NoMatch(f"the softmax is sliced by {p.args[1]!r}, not [..., :-1] (the sink's column dropped)")
    if _arg(sm, 0, "dim", None) not in (-1, smv.dim() - 1):
        raise NoMatch("the sink softmax is not over the key dimension")
    dtype = _arg(sm, 1, "dtype", None)
    if dtype not in (None, torch.float32, torch.float64):
        raise NoMatch(f"the sink softmax runs in {dtype}; the forms' softmax is float32")
    nodes = [p, sm]
    x = _self(sm)
    if _is_fn(x, operator.sub, torch.sub):
        logits, row_max = x.args[0], x.args[1]
        if len(x.args) != 2 or x.kwargs or not _is_row_max_of(row_max, logits):
            raise NoMatch("the sink logits are shifted by something other than their own row max")
        nodes += [x] + _row_max_nodes(row_max)
        x = logits
    if not (_is_fn(x, torch.cat) and len(x.args) >= 1 and isinstance(x.args[0], (list, tuple))
            and len(x.args[0]) == 2):
        raise NoMatch("the sliced softmax is not over cat([scores, sinks])")
    cat_dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    if cat_dim not in (-1, 3):
        raise NoMatch(f"the sink column is concatenated along dim {cat_dim}, not the key dimension")
    nodes.append(x)
    scores, column = x.args[0]
    sv, cv = _val(scores), _val(column)
    if sv is None or cv is None or sv.dim() != 4 or cv.dim() != 4:
        raise NoMatch("the scores or the sink column are not 4-D")
    B, H, S, _ = sv.shape
    if not (all(_same(a, b) for a, b in zip(cv.shape[:3], (B, H, S))) and _same(cv.shape[3], 1)):
        raise NoMatch(f"the sink column is {list(cv.shape)}, not [B, H, S, 1]")
    sinks, column_nodes = _per_head_source(column, H)
    nodes += column_nodes
    return SinkSoftmax(scores, sinks, nodes)


def _drops_last_column(index: Any, rank: int) -> bool:
    """index is [..., :-1] (Ellipsis then slice(None, -1)) or full slices then slice(None, -1)."""
    if not isinstance(index, tuple) or not index:
        return False
    last = index[-1]
    if not (isinstance(last, slice) and last.start in (None, 0) and last.stop == -1 and last.step in (None, 1)):
        return False
    head = index[:-1]
    if head == (Ellipsis,):
        return True
    return len(head) == rank - 1 and all(isinstance(s, slice) and s == slice(None) for s in head)


def _is_row_max_of(row_max: Any, logits: fx.Node) -> bool:
    """row_max = logits.max(dim=-1, keepdim=True).values (or [0]), or logits.amax(-1, keepdim=True)."""
    from mla_compile.passes.match import _arg, _is_fn, _is_method

    m = row_max
    if _is_fn(m, operator.getitem) and m.args[1] == 0:
        m = m.args[0]
        if not (_is_method(m, "max") or _is_fn(m, torch.max)):
            return False
    elif not (_is_method(m, "amax") or _is_fn(m, torch.amax)):
        return False
    if m.args[0] is not logits:
        return False
    return _arg(m, 0, "dim", None) in (-1, 3, (-1,), [-1]) and bool(_arg(m, 1, "keepdim", False))


def _row_max_nodes(row_max: fx.Node) -> list[fx.Node]:
    from mla_compile.passes.match import _is_fn

    return [row_max, row_max.args[0]] if _is_fn(row_max, operator.getitem) else [row_max]


def _per_head_source(column: fx.Node, H: int) -> tuple[fx.Node, list[fx.Node]]:
    """column = expand(view/reshape(sinks [H], 1, H, 1, 1) [, B, H, S, 1]): the [H] tensor and the nodes."""
    from mla_compile.passes.match import NoMatch, _is_method, _same, _self, _val

    nodes = []
    x = column
    if _is_method(x, "expand", "expand_as"):
        nodes.append(x)
        x = _self(x)
    xv = _val(x)
    if xv is None or xv.dim() != 4 or not (_same(xv.shape[1], H) and all(_same(n, 1) for n in
                                                                          (xv.shape[0], xv.shape[2], xv.shape[3]))):
        raise NoMatch("the sink column is not one value per head broadcast over batch and queries "
                      f"(its source is {list(xv.shape) if xv is not None else '?'}, not [1, H, 1, 1])")
    if _is_method(x, "reshape", "view"):
        nodes.append(x)
        x = _self(x)
    sv = _val(x)
    if sv is None or sv.dim() != 1 or not _same(sv.shape[0], H) or not sv.dtype.is_floating_point:
        raise NoMatch("the sink logits are not a float [H] tensor reshaped to [1, H, 1, 1]")
    return x, nodes
