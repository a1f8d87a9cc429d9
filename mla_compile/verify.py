"""options={"verify": True}: run the original graph beside the rewritten one and raise on mismatch.

On the first `calls` calls the untouched graph (HF's own computation, run eagerly) runs on the same
inputs before the compiled one; every floating output of the two is compared, and a disagreement
beyond the dtype's tolerance raises `VerificationError` with the relative error, the cosine
similarity and the WMAPE of the rewrite against the original. In-place writes in these graphs are
cache updates that write the same values at the same positions, so running both is safe.
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


class VerificationError(AssertionError):
    pass


def errors(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    g, w = got.double().flatten(), want.double().flatten()
    diff = (g - w).abs()
    rel = float(diff.norm() / w.norm().clamp_min(1e-30))
    cos = float(torch.nn.functional.cosine_similarity(g, w, dim=0, eps=1e-30)) if g.numel() else 1.0
    wmape = float(diff.sum() / w.abs().sum().clamp_min(1e-30))
    return {"relative_error": rel, "cosine_similarity": cos, "wmape": wmape}


def verified(compiled, original, calls: int, graph_id: int):
    state = {"left": calls}

    def run(*args):
        if state["left"] <= 0:
            return compiled(*args)
        state["left"] -= 1
        want = original(*args)
        got = compiled(*args)
        flat_got, flat_want = _flatten(got), _flatten(want)
        for i, (g, w) in enumerate(zip(flat_got, flat_want)):
            if not (isinstance(g, torch.Tensor) and g.is_floating_point()):
                continue
            tol = TOLERANCE.get(w.dtype, 1e-4)
            finite = torch.isfinite(w)
            if not torch.equal(finite, torch.isfinite(g)):
                raise VerificationError(f"graph {graph_id} output {i}: the rewrite's non-finite values differ from the original's")
            e = errors(g[finite], w[finite])
            if e["relative_error"] > tol:
                raise VerificationError(
                    f"graph {graph_id} output {i}: the MLA rewrite disagrees with the original graph "
                    f"beyond the {w.dtype} tolerance {tol:g}: " + ", ".join(f"{k}={v:.3g}" for k, v in e.items()))
        return got

    return run


def _flatten(x):
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    return [x]
