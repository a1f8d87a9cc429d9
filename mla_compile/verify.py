"""options={"verify": True} (or MLA_COMPILE_VERIFY=1): run the original graph beside the rewritten one
and raise on mismatch.

On the first `calls` calls the untouched graph (HF's own computation, run eagerly, without autograd)
runs on the same inputs before the compiled one; every floating output of the two is compared, and
a disagreement beyond the output dtype's tolerance raises `VerificationError` with the relative
error, the cosine similarity and the WMAPE of the rewrite against the original, and, where the
original graph can be recomputed in float64 (its parameters and floating inputs promoted), the same
three figures for both the rewrite and HF's original against that float64 answer, so the message
says which of the two is wrong. In-place writes in these graphs are cache updates that write the same
values at the same positions, so running both is safe (the float64 run writes into copies).

Padding: where HF's 2-D attention_mask is among the graph's inputs, the positions it marks as
padding are left out (in outputs whose token dim can be told by its size): no real token reads them,
and a sparse form legitimately gives zeros for a query row whose selected keys are all masked, where
HF averages the whole masked row.

Non-finite values: the rewrite may not produce a NaN or inf where the original is finite; where the
original is non-finite and the rewrite finite (an all-masked row that HF turns into NaN), the
position is left out of the comparison.
"""

from __future__ import annotations

import copy
import logging
import threading

import torch

log = logging.getLogger("mla_compile")

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


class VerificationError(AssertionError):
    pass


def errors(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """Relative (Frobenius) error, cosine similarity and WMAPE of got against want."""
    g, w = got.detach().double().flatten(), want.detach().double().flatten()
    diff = (g - w).abs()
    if not g.numel():
        return {"relative_error": 0.0, "cosine_similarity": 1.0, "wmape": 0.0}
    rel = float(diff.norm() / w.norm().clamp_min(1e-30))
    if g.norm() == 0 and w.norm() == 0:
        cos = 1.0
    else:
        cos = float(torch.nn.functional.cosine_similarity(g, w, dim=0, eps=1e-30))
    wmape = float(diff.sum() / w.abs().sum().clamp_min(1e-30))
    return {"relative_error": rel, "cosine_similarity": cos, "wmape": wmape}


def _fmt(e: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in e.items())


_HALF_METHODS = ("float", "half", "bfloat16")


def _to_f64(x):
    if isinstance(x, torch.dtype) and x.is_floating_point:
        return torch.float64
    if isinstance(x, (list, tuple)):
        return type(x)(_to_f64(y) for y in x)
    if isinstance(x, dict):
        return {k: _to_f64(v) for k, v in x.items()}
    return x


def promoted_to_float64(original):
    """A copy of the graph module computing in float64: parameters and buffers promoted, every
    floating dtype named in the graph (`.to(torch.float32)`, `dtype=`) and `.float()` / `.half()`
    calls turned into float64."""
    gm = copy.deepcopy(original)
    graph = getattr(gm, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            node.args = _to_f64(node.args)
            node.kwargs = _to_f64(node.kwargs)
            if node.op == "call_method" and node.target in _HALF_METHODS:
                node.target = "double"
        gm.recompile()
    return gm.double()


def float64_outputs(original, args) -> list | None:
    """The original graph recomputed in float64 (parameters, buffers, floating inputs and the graph's
    own dtypes promoted), or None when the graph cannot run so."""
    try:
        gm = promoted_to_float64(original)
        promoted = [a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.no_grad():
            return _flatten(gm(*promoted))
    except Exception:
        return None


def padding_of(original, args):
    """HF's 2-D attention_mask among the graph inputs, as a bool [B, L] tensor (True = padding), or None."""
    graph = getattr(original, "graph", None)
    if graph is None:
        return None
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    for name, a in zip(names, args):
        if "attention_mask" in name.lower() and isinstance(a, torch.Tensor) and a.dim() == 2 \
                and not a.is_floating_point():
            return a == 0
    return None


def _keep(out: torch.Tensor, padding) -> torch.Tensor:
    """True where out is not at a padding position: the first dim after the batch whose size is the
    mask's length is taken as the token dim (HF's logits [B, L, V], caches [B, 1, L, d])."""
    keep = torch.ones(out.shape, dtype=torch.bool, device=out.device)
    if padding is None or out.dim() < 2 or out.shape[0] != padding.shape[0]:
        return keep
    L = padding.shape[1]
    for d in range(1, out.dim()):
        if out.shape[d] == L:
            shape = [1] * out.dim()
            shape[0], shape[d] = out.shape[0], L
            return keep & ~padding.to(out.device).view(shape)
    return keep


def compare(flat_got, flat_want, graph_id, original=None, args=None, padding=None):
    """Raise VerificationError when an output of the rewrite disagrees with the original's (padding
    positions, True in `padding` [B, L], are left out)."""
    reference = None
    worst = None                      # (relative error, output index, errors) of the outputs checked
    for i, (g, w) in enumerate(zip(flat_got, flat_want)):
        if not (isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor) and w.is_floating_point()):
            continue
        if g.shape != w.shape:
            raise VerificationError(f"graph {graph_id} output {i}: the rewrite's shape {tuple(g.shape)} differs "
                                    f"from the original's {tuple(w.shape)}")
        g, w = g.detach(), w.detach()
        tol = TOLERANCE.get(w.dtype, 1e-4)
        keep = _keep(w, padding)
        finite_w, finite_g = torch.isfinite(w), torch.isfinite(g)
        if bool((keep & finite_w & ~finite_g).any()):
            bad = int((keep & finite_w & ~finite_g).sum())
            raise VerificationError(f"graph {graph_id} output {i}: the rewrite gives {bad} NaN/inf values "
                                    f"where the original is finite")
        both = keep & finite_w & finite_g
        e = errors(g[both], w[both])
        if e["relative_error"] <= tol:
            if worst is None or e["relative_error"] > worst[0]:
                worst = (e["relative_error"], i, e, tol)
            continue
        msg = (f"graph {graph_id} output {i}: the MLA rewrite disagrees with the original graph beyond the "
               f"{w.dtype} tolerance {tol:g}: rewrite vs original: {_fmt(e)}")
        if original is not None and reference is None:
            reference = float64_outputs(original, args) or []
        if reference and i < len(reference) and isinstance(reference[i], torch.Tensor) \
                and reference[i].shape == w.shape:
            r = reference[i]
            fin = both & torch.isfinite(r)
            msg += (f"; against a float64 recomputation of the original graph: rewrite {_fmt(errors(g[fin], r[fin]))}"
                    f"; original {_fmt(errors(w[fin], r[fin]))}")
        else:
            msg += "; (no float64 recomputation: the graph does not run in float64)"
        raise VerificationError(msg)
    if worst is not None:
        # at WARNING, so that it shows by default: the user asked for verification and should see it ran
        log.warning("verify: graph %s matches the original (worst output %d: %s; tolerance %g)", graph_id, worst[1],
                 _fmt(worst[2]), worst[3])


def verified(compiled, original, calls: int, graph_id: int):
    """Wrap a compiled graph: its first `calls` calls also run `original` and compare (thread-safe)."""
    state = {"left": calls}
    lock = threading.Lock()

    def run(*args):
        with lock:
            check = state["left"] > 0
            if check:
                state["left"] -= 1
        if not check:
            return compiled(*args)
        with torch.no_grad():
            want = original(*args)
        got = compiled(*args)
        compare(_flatten(got), _flatten(want), graph_id, original, args, padding_of(original, args))
        return got

    run.verify_state = state
    return run


def _flatten(x):
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    return [x]
