"""Which form a region gets.

Interim rule (replaced by the sympy cost model in mla_compile.cost): compare FLOPs only.
Per head and batch, the expanded form pays r*(dn+dv) per cached token for the expansion and
(dn+dr+dv) per query-key pair; the absorbed form pays (2r+dr) per query-key pair and nothing per
cached token. They are equal at

    S* = r*(dn+dv) / (2r - dn - dv)       (170.7 for DeepSeek-V3: r=512, dn=dv=128)

so absorbed while S < S*, else expanded. A DSA region attends to k keys instead of T when T > k
(sparse forms, absorbed or expanded by the same rule); with T <= k the selection is everything and
a dense form under the base mask is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mla_compile.passes.forms import DENSE_FORMS, FORMS, SPARSE_FORMS
from mla_compile.passes.match import Region


@dataclass
class Decision:
    form: str                      # a form name, or "auto" (chosen at run time)
    reason: str
    dense_mask: str = "full"       # "base": a dense form of a DSA region may drop the top-k mask
    chooser: Any = None            # for "auto": passes.dispatch.Chooser
    costs: dict = field(default_factory=dict)
    expressions: dict = field(default_factory=dict)
    crossover: str | None = None
    device: dict = field(default_factory=dict)


def _flop_crossover(d: dict) -> float:
    denom = 2 * d["r"] - d["dn"] - d["dv"]
    return float("inf") if denom <= 0 else d["r"] * (d["dn"] + d["dv"]) / denom


def _static(x) -> bool:
    return isinstance(x, int)


def rule_form(d: dict, S: int, T: int, k: int | None) -> str:
    dense = "absorbed" if S < _flop_crossover(d) else "expanded"
    if k is not None and T > k:
        return "sparse_" + dense
    return dense


def decide(region: Region, forced: str = "auto", device: str | None = None) -> Decision:
    d = region.dims
    S, T, k = d["S"], d["T"], region.topk
    if forced not in ("auto",) + FORMS + ("sparse",):
        raise ValueError(f"options['form']: unknown form {forced!r}; expected 'auto', 'sparse' or one of {FORMS}")
    if forced != "auto":
        if forced == "sparse":
            forced = "sparse_absorbed"
        if forced in SPARSE_FORMS and not region.is_sparse:
            dense = forced.removeprefix("sparse_")
            return Decision(dense, f"forced {forced!r}, but this region has no top-k indexer: dense {dense}")
        if forced in DENSE_FORMS and region.is_sparse:
            return Decision(forced, f"forced {forced!r} (dense over the full DSA mask)")
        return Decision(forced, f"forced by options['form']={forced!r}")
    star = _flop_crossover(d)
    if _static(S) and _static(T) and (k is None or _static(k)):
        form = rule_form(d, S, T, k)
        why = f"S={S} {'<' if S < star else '>='} S*={star:.1f} (equal-FLOP point of absorbed vs expanded)"
        if region.is_sparse:
            why += f"; top-k k={k} {'<' if T > k else '>='} T={T}"
            if T <= k:
                return Decision(form, why + ": the selection is every key, dense is exact", dense_mask="base")
        return Decision(form, why)
    from mla_compile.passes.dispatch import Chooser

    text = f"absorbed while S < {star:.1f}, else expanded" + ("; sparse while T > k" if region.is_sparse else "")
    ch = Chooser(lambda s: rule_form(d, s["S"], s["T"], s["k"]), text)
    return Decision("auto", "dynamic sizes: chosen per call", chooser=ch, crossover=text)
