"""The `mla` torch.compile backend.

    torch.compile(model, backend="mla", options={"form": "auto", "log": "rewrites.jsonl", "verify": False})

For each graph Dynamo hands over: find the MLA attention regions (mla_compile.passes.match), choose
a form for each (mla_compile.passes.choose), rewrite the region into that form's op
(mla_compile.passes.rewrite), record every decision and every near-miss in the rewrite log, and hand
the whole graph to Inductor (`compile_fx`), so the parts we do not touch compile exactly as
`backend="inductor"` would compile them.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.fx as fx

from mla_compile.rewrite_log import CompileTimes, RewriteRecord, record, record_compile

log = logging.getLogger("mla_compile")


def capture_data_dependent_shapes() -> None:
    """Turn on Dynamo's capture_dynamic_output_shape_ops unless the user has set it, either way.

    Without it Dynamo ends the graph at an operator whose output shape depends on data (`nonzero`,
    boolean indexing), and glm5_next's indexer calls one inside attention: no graph would hold the
    attention, and it would run as HF wrote it. Dynamo reads the setting while tracing, before any
    backend runs, so it is set when the backend is loaded, which `backend="mla"` does before the first
    trace. A user who sets it to False keeps it, and the rewrite log then says, for each attention
    Dynamo cut, that this setting is why."""
    import torch._dynamo.config as dynamo_config

    try:
        untouched = dynamo_config._is_default("capture_dynamic_output_shape_ops")
    except Exception:  # noqa: BLE001 - another torch's config internals: leave the setting as it is
        return
    if untouched:
        dynamo_config.capture_dynamic_output_shape_ops = True
        log.info("mla_compile: turned on torch._dynamo.config.capture_dynamic_output_shape_ops (set it to False "
                 "before loading the backend to keep Dynamo's default)")


capture_data_dependent_shapes()

_GRAPH_IDS = itertools.count(1)


def reset_graph_ids() -> None:
    """Number the next compiled graph 1 again (mla_compile.reset())."""
    global _GRAPH_IDS
    _GRAPH_IDS = itertools.count(1)


@dataclass(frozen=True)
class Options:
    """`options=` of torch.compile(..., backend="mla"); environment variables give the defaults."""

    form: str = "auto"            # "auto", or force "expanded" | "absorbed" | "sparse_absorbed" | "sparse_expanded" | "sparse"
    log: str | None = None        # path: append the rewrite records as JSON lines (MLA_COMPILE_LOG)
    verify: bool = False          # run the original graph beside the rewritten one on the first calls (MLA_COMPILE_VERIFY)
    verify_calls: int = 2         # how many first calls verify checks
    remainder: str = "inductor"   # "inductor", or "eager" to run the rewritten graph without Inductor (fast tests)
    device: str | None = None     # cost model device override ("h100", "h200", "cpu", ...)

    @classmethod
    def parse(cls, options: dict | None) -> "Options":
        env = {
            "form": os.environ.get("MLA_COMPILE_FORM", "auto"),
            "log": os.environ.get("MLA_COMPILE_LOG") or None,
            "verify": os.environ.get("MLA_COMPILE_VERIFY", "0") not in ("", "0", "false", "False"),
            "remainder": os.environ.get("MLA_COMPILE_REMAINDER", "inductor"),
            "device": os.environ.get("MLA_COMPILE_DEVICE") or None,
        }
        names = {f.name for f in fields(cls)}
        options = dict(options or {})
        unknown = set(options) - names
        if unknown:
            raise ValueError(f"torch.compile(backend='mla'): unknown options {sorted(unknown)}; known: {sorted(names)}")
        opts = cls(**{**env, **options})
        if opts.remainder not in ("inductor", "eager"):
            raise ValueError(f"options['remainder']: expected 'inductor' or 'eager', got {opts.remainder!r}")
        from mla_compile.passes.choose import FORCED_CHOICES

        if opts.form not in FORCED_CHOICES:
            raise ValueError(f"options['form']: unknown form {opts.form!r}; expected one of {FORCED_CHOICES}")
        if not isinstance(opts.verify, bool):
            raise TypeError(f"options['verify']: expected True or False, got {opts.verify!r}")
        if not isinstance(opts.verify_calls, int) or isinstance(opts.verify_calls, bool) or opts.verify_calls < 1:
            raise TypeError(f"options['verify_calls']: expected an int >= 1, got {opts.verify_calls!r}")
        return opts


def _shapes_for_log(dims: dict) -> dict:
    """Sizes as the log shows them: ints, or "dynamic" for a size Dynamo made symbolic (its symbol
    names, such as s40 + 1, differ between graphs and say nothing to a reader); a DSA region's k
    shows the indexer's top-k where HF takes min(index_topk, T)."""
    from mla_compile.passes.choose import _static_topk

    out = {}
    for key, v in dims.items():
        if key == "k" and v is not None and not isinstance(v, int):
            v = _static_topk(v)
        out[key] = v if isinstance(v, int) or v is None else "dynamic"
    return out


def rewrite_graph(gm: fx.GraphModule, opts: Options, graph_id: int,
                  times: CompileTimes | None = None) -> list[RewriteRecord]:
    """Find, decide and rewrite every MLA region of gm in place; return the log records. `times`, if
    given, gets the seconds each pass took."""
    from mla_compile.passes.choose import decide, plan_flags
    from mla_compile.passes.dispatch import register
    from mla_compile.passes.match import find_regions
    from mla_compile.passes.rewrite import rewrite

    times = times if times is not None else CompileTimes(graph_id)
    start = time.perf_counter()
    regions, misses = find_regions(gm)
    times.regions = len(regions) + len(misses)
    times.match_s = time.perf_counter() - start
    example_device = next((v.device for n in gm.graph.nodes if n.op == "placeholder"
                           for v in [n.meta.get("example_value")] if isinstance(v, torch.Tensor)), None)
    records = []
    for miss in misses:
        records.append(RewriteRecord(module=miss.module, status="skipped", form=None, family=miss.family,
                                     shapes=_shapes_for_log(miss.dims), reason=miss.reason, core=miss.core,
                                     graph=graph_id))
    for region in regions:
        before = set(gm.graph.nodes)
        try:
            start = time.perf_counter()
            decision = decide(region, opts.form, device=opts.device, example_device=example_device)
            times.decide_s += time.perf_counter() - start
            start = time.perf_counter()
            plan_id = register(decision.chooser) if decision.form == "auto" else None
            rewrite(gm, region, decision.form, dense_mask=decision.dense_mask, plan_id=plan_id)
            times.rewrite_s += time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - no exception of ours escapes the backend
            for n in reversed([n for n in gm.graph.nodes if n not in before]):
                if not n.users:                      # what the failed rewrite inserted
                    gm.graph.erase_node(n)
            records.append(RewriteRecord(module=region.module, status="skipped", form=None, family=region.family,
                                         shapes=_shapes_for_log(region.dims), core=region.core, graph=graph_id,
                                         reason=f"the decision or rewrite stopped on {type(e).__name__}: {e}; "
                                                "left as written"))
            continue
        records.append(RewriteRecord(
            module=region.module, status="rewritten", form=decision.form, family=region.family,
            shapes=_shapes_for_log(region.dims), core=region.core,
            reason=decision.reason + ("; with its softmax's attention sinks" if region.sinks is not None else ""),
            dtype=str(region.dtype).removeprefix("torch."), costs=decision.costs,
            expressions=decision.expressions, crossover=decision.crossover, device=decision.device,
            graph=graph_id, flags=plan_flags(region),
            runs=decision.chooser.counts if decision.form == "auto" else {}))
    times.deferred = opts.remainder == "inductor" and first_step_of_growing_cache(gm, regions)
    if regions:
        start = time.perf_counter()
        gm.graph.lint()
        gm.recompile()
        times.rewrite_s += time.perf_counter() - start
    return records


def first_step_of_growing_cache(gm: fx.GraphModule, regions) -> bool:
    """Whether the graph is the first decode step over a cache that grows by concatenation (HF's
    DynamicCache): every size in it static, and every region attends with one query to a latent
    that is the `cat` of a graph input (the cache so far) and this step's rows. The next step's cache
    is one token longer, so Dynamo traces it again with a dynamic length, and that graph serves every
    later step: in a generate() loop this one runs once. A StaticCache's latent is its buffer,
    written in place, never a `cat`."""
    def static(value) -> bool:
        if isinstance(value, torch.Tensor):
            return all(type(n) is int for n in (*value.shape, *value.stride()))
        return not isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))

    def appended(node) -> bool:
        if node.op != "call_function" or node.target not in (torch.cat, torch.ops.aten.cat.default):
            return False
        parts = node.args[0] if node.args else None
        return isinstance(parts, (list, tuple)) and len(parts) == 2 and getattr(parts[0], "op", None) == "placeholder"

    if not regions or not all(r.dims.get("S") == 1 and appended(r.latent) for r in regions):
        return False
    return all(static(n.meta.get("example_value")) for n in gm.graph.nodes if n.op == "placeholder")


class CompiledOnReuse:
    """The rewritten graph run without Inductor at its first call, compiled by Inductor at its
    second (with that call's tensors as the example inputs; the graph's sizes are all static, so
    the compile adds no guard). For graphs that a generate() loop calls once
    (`first_step_of_growing_cache`): their Inductor compile would be paid for a single step."""

    def __init__(self, gm: fx.GraphModule, patches: dict, times: CompileTimes):
        self.gm, self.patches, self.times = gm, patches, times
        self.compiled = None
        self.calls = 0

    def __call__(self, *args):
        if self.compiled is None:
            self.calls += 1
            if self.calls == 1:
                return self.gm.forward(*args)
            from torch._inductor.compile_fx import compile_fx

            start = time.perf_counter()
            self.compiled = compile_fx(self.gm, list(args), config_patches=self.patches)
            self.times.inductor_s = time.perf_counter() - start
        return self.compiled(*args)


_SAID_SLOW = []


def _say_inductor_on_cpu_is_slow(example_inputs) -> None:
    """Once a process: Inductor's CPU compile of a whole model takes minutes; say so, and how to skip it."""
    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
    if on_cpu and not _SAID_SLOW:
        _SAID_SLOW.append(True)
        log.warning("mla_compile: Inductor is compiling the rest of each graph for the CPU; for a whole model "
                    "this takes a minute or more on a few cores (options={'remainder': 'eager'} runs the "
                    "rewritten graph without Inductor)")


def mla_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, mode: str | None = None):
    """The Dynamo backend registered as `mla` (entry point group torch_dynamo_backends)."""
    import mla_compile.passes.dispatch  # noqa: F401  (registers torch.ops.mla.auto)
    import mla_compile.passes.forms  # noqa: F401  (registers torch.ops.mla.<form>)

    opts = Options.parse(options)
    graph_id = next(_GRAPH_IDS)
    original = copy.deepcopy(gm) if opts.verify else None
    times = CompileTimes(graph_id)
    for rec in rewrite_graph(gm, opts, graph_id, times):
        record(rec, opts.log)
    if opts.remainder == "eager":
        compiled = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx

        _say_inductor_on_cpu_is_slow(example_inputs)

        patches = {"triton.cudagraphs": True} if mode in ("reduce-overhead", "max-autotune") else {}
        if mode == "max-autotune":
            patches.update({"max_autotune": True})
        if times.deferred:
            compiled = CompiledOnReuse(gm, patches, times)
        else:
            start = time.perf_counter()
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
            times.inductor_s = time.perf_counter() - start
    record_compile(times)
    if original is not None:
        from mla_compile.verify import verified

        return verified(compiled, original, opts.verify_calls, graph_id)
    return compiled
