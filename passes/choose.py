"""Which form a region gets: the sympy cost model (mla_compile.cost) decides, per shape and device.

Static sizes: `plan(...)` predicts every candidate form's time on the device's roofline and the
cheapest wins at compile time. Symbolic sizes (Dynamo marked the query or key length dynamic): the
same expressions, with the dynamic sizes as symbols, give a chooser evaluated on the real sizes at
each call (`torch.ops.mla.auto`) and a closed-form crossover for the log; the graph is compiled once.

A form forced through options wins over the model, with two corrections the region's structure
demands: a sparse form on a region without an indexer becomes its dense counterpart, and a dense
form on a DSA region keeps HF's full top-k mask (exact whatever k is).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from mla_compile.cost import plan
from mla_compile.cost.devices import DeviceModel
from mla_compile.passes.dispatch import Chooser
from mla_compile.passes.forms import DENSE_FORMS, FORMS, SPARSE_FORMS
from mla_compile.passes.match import Region
from mla_compile.rewrite_log import format_seconds

FORCED_CHOICES = ("auto", "sparse") + FORMS


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


def _static_topk(k: Any) -> int | None:
    """The indexer's k: HF takes min(index_topk, T), so a symbolic k is Min(index_topk, T-expr)."""
    if k is None or isinstance(k, int):
        return k
    expr = k.node.expr if isinstance(k, torch.SymInt) else sympy.sympify(str(k))
    if type(expr).__name__ == "Min":      # sympy's Min, or torch's own (torch.utils._sympy)
        nums = [a for a in expr.args if a.is_number]
        if nums:
            return int(min(nums))
    return None


def plan_flags(region: Region) -> dict:
    """The plan's flags for a region: causal (decoder attention, which a mask or is_causal means) and
    whether a mask tensor is read. The log records them, so that `explain` and its plot re-ask the
    cost model exactly what the decision asked."""
    return {"causal": bool(region.is_causal or region.mask is not None), "mask": region.mask is not None}


def _plan_args(region: Region, device) -> dict:
    d = region.dims
    sizes = {}
    for key, name in (("B", "batch"), ("S", "q_len"), ("T", "kv_len")):
        v = d[key]
        # A dynamic size enters the model as a plain symbol named after its role, so the run-time
        # chooser is fed {"B", "S", "T"} and the crossover reads "absorbed while S < ...".
        sizes[name] = v if isinstance(v, int) else sympy.Symbol(key, positive=True, integer=True)
    return dict(sizes, heads=d["H"], kv_lora_rank=d["r"], qk_rope_head_dim=d["dr"], qk_nope_head_dim=d["dn"],
                v_head_dim=d["dv"], topk=_static_topk(region.topk) if region.is_sparse else None,
                dtype=region.dtype, device=device, **plan_flags(region))


def _device_for(device_option: str | None, example_device: torch.device | None):
    if device_option:
        return device_option
    if example_device is not None and example_device.type == "cuda":
        return example_device
    return "cpu"


def decide(region: Region, forced: str = "auto", device: str | None = None,
           example_device: torch.device | None = None) -> Decision:
    if forced not in FORCED_CHOICES:
        raise ValueError(f"options['form']: unknown form {forced!r}; expected one of {FORCED_CHOICES}")
    if region.shared_kv:
        decision = _shared_kv_decision(region, _device_for(device, example_device))
        if region.topk_indices is not None and forced != "auto":      # CSA: a sparse form gathers, a dense one not
            decision.form = "latent_mqa_gathered" if forced in ("sparse",) + SPARSE_FORMS else "latent_mqa"
            decision.reason += f"; options['form']={forced!r}: {decision.form}"
            return decision
        if forced != "auto":
            decision.reason += f"; options['form']={forced!r} names an MLA form, which needs W_UK / W_UV: not applied"
        return decision
    if forced != "auto":
        return _forced(region, "sparse_absorbed" if forced == "sparse" else forced)
    from mla_compile.cost.plan import resolve_device

    # the figures as read now (a calibration may have been written since the last region), and the
    # float32 matmul precision the plan reads, are part of what the memo is keyed on
    dev = resolve_device(_device_for(device, example_device))
    args = _plan_args(region, dev)
    sizes = tuple(sorted((k, v) for k, v in args.items() if k != "device"))
    p, expressions, runtime = _priced(dev.to_json(), torch.get_float32_matmul_precision(), sizes)
    expressions = dict(expressions)
    if p.form is not None:        # every size static: decide now
        others = sorted((t, f) for f, t in p.costs.items() if f != p.form)
        why = f"{p.form} {format_seconds(p.costs[p.form])}"
        if others:
            why += " vs " + ", ".join(f"{f} {format_seconds(t)}" for t, f in others)
        why += f" predicted on {p.device.get('name', '?')}"
        dense_mask = "full"
        if region.is_sparse and p.form in DENSE_FORMS and args["topk"] is not None \
                and isinstance(args["kv_len"], int) and args["kv_len"] <= args["topk"]:
            why += f"; T={args['kv_len']} <= k={args['topk']}: the selection is every key, dense is exact"
            dense_mask = "base"
        return Decision(p.form, why, dense_mask=dense_mask, costs=dict(p.costs), expressions=expressions,
                        device=dict(p.device))
    choose, text = runtime
    if region.is_sparse and args["topk"] is None:
        raise ValueError("a DSA region with a symbolic top-k needs a static index_topk")
    return Decision("auto", "dynamic sizes: the form is chosen per call on the predicted times",
                    chooser=Chooser(choose, text), expressions=expressions, crossover=text,
                    device=dict(p.device))


@functools.lru_cache(maxsize=256)
def _priced(device_json: str, matmul_precision: str, plan_args: tuple):
    """The cost plan of these arguments on this device's figures, its expressions as text, and for
    symbolic sizes its run-time chooser (choose, crossover text): worked out once per distinct set,
    since the sympy work is most of the backend's own compile time and a model's layers share one set.
    The plan is read, never changed; each region gets its own Chooser (its call counts) around the
    shared choose function. `matmul_precision` keys torch's float32 setting, which plan() reads."""
    p = plan(**dict(plan_args), device=DeviceModel.from_dict(json.loads(device_json)))
    expressions = {f: str(e) for f, e in p.expressions.items()}
    return p, expressions, (p.runtime_chooser() if p.form is None else None)


def _forced(region: Region, forced: str) -> Decision:
    if forced in SPARSE_FORMS and not region.is_sparse:
        dense = forced.removeprefix("sparse_")
        return Decision(dense, f"forced {forced!r}, but no HF top-k index mask (indices scattered into "
                               f"new_ones, then masked_fill) feeds this region: dense {dense}")
    if forced in DENSE_FORMS and region.is_sparse:
        return Decision(forced, f"forced {forced!r} (dense over HF's full top-k mask)")
    return Decision(forced, f"forced by options['form']={forced!r}")


def _shared_kv_decision(region: Region, device) -> Decision:
    """Latent MQA has one form. HF's alternative repeats the shared head to every query head and
    reads each copy: the same FLOPs and H times the key/value bytes, so no size makes it cheaper. The
    cost model (`cost/shared_kv.py`) prices both for the log. A forced form names the MLA forms, which
    need W_UK / W_UV: it is not applied here."""
    from mla_compile.cost.plan import resolve_device
    from mla_compile.cost.shared_kv import shared_kv_costs

    d = region.dims
    dev = resolve_device(device)
    flags = plan_flags(region)
    if region.topk_indices is not None:
        return _csa_decision(region, dev)
    costs = shared_kv_costs(dict(B=d["B"], H=d["H"], S=d["S"], T=d["T"], D=d["r"]), dev,
                            region.dtype or torch.float32, **flags)
    H = d["H"]
    why = (f"one key/value head shared by all {H} query heads (K = V): attended once over it, where HF reads a "
           f"copy per head (same FLOPs, 1/{H} of the key/value bytes)")
    seconds = {form: t for form, (_, t) in costs.items() if t is not None}
    if len(seconds) == len(costs):
        why += (f"; latent_mqa {format_seconds(seconds['latent_mqa'])} vs as written "
                f"{format_seconds(seconds['as_written'])} predicted on {dev.name}")
    if region.note:
        why += f"; {region.note}"
    return Decision("latent_mqa", why, costs=seconds, expressions={f: str(x) for f, (x, _) in costs.items()},
                    device={"name": dev.name})


def _csa_decision(region: Region, dev) -> Decision:
    """DeepSeek-V4's CSA region (its top-k bias proven, passes/shared_kv.py): the picked entries gathered
    or, where the model predicts it cheaper, dense latent MQA under HF's mask (exact too). Symbolic
    sizes: gathered, which reads at most the rows the dense form reads."""
    from mla_compile.cost.shared_kv import gathered_costs

    d = region.dims
    costs = gathered_costs(dict(B=d["B"], H=d["H"], S=d["S"], T=d["T"], D=d["r"], W=d["W"], k=d["k"]), dev,
                           region.dtype or torch.float32)
    seconds = {form: t for form, (_, t) in costs.items() if t is not None}
    why = (f"one key/value head shared by all {d['H']} query heads (K = V), CSA's top-k picks proven from HF's "
           f"dense bias")
    form = "latent_mqa_gathered"
    if len(seconds) == len(costs):
        form = min(("latent_mqa_gathered", "latent_mqa"), key=lambda f: seconds[f])
        others = ", ".join(f"{f} {format_seconds(seconds[f])}" for f in costs if f != form)
        why += f": {form} {format_seconds(seconds[form])} vs {others} predicted on {dev.name}"
        why += ("; the picked entries gathered" if form == "latent_mqa_gathered"
                else "; dense over HF's mask (exact: the bias is applied as written)")
    else:
        why += "; dynamic sizes: the picked entries gathered (never more rows read than dense)"
    if (region.layout or {}).get("picks_below") is not None:
        why += ("; the indexer's entry count is not provably the compressor's C: picks at or past C are dropped "
                "when gathered, as HF's spare column drops C")
    return Decision(form, why, costs=seconds, expressions={f: str(x) for f, (x, _) in costs.items()},
                    device={"name": dev.name})
