"""The rewrite log: one record per MLA region the backend saw, rewritten or left alone, with why.

Records accumulate since import or since `reset()`; `rewrite_log()` returns them, `format_rewrite_log()`
renders a table, MLA_COMPILE_LOG=path.jsonl (or `options={"log": path}`) appends them as JSON lines,
and each record also goes to the `mla_compile` Python logger (and so to TORCH_LOGS="+mla_compile").

Beside them, one `CompileTimes` per graph the backend compiled: where its part of the compile time
went (finding the regions, the cost model's decisions, the rewrite, Inductor's compile of the
rewritten graph). `compile_times()` returns them and the table ends with them. Dynamo's tracing
happens before the backend is called, and Triton's compiles and autotuning of a graph's kernels
during its first run, so neither is in them: a first call's time minus these is theirs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("mla_compile")

_LOCK = threading.Lock()
_RECORDS: list["RewriteRecord"] = []


@dataclass
class RewriteRecord:
    module: str                      # qualified module name in the user's model, e.g. model.layers.3.self_attn
    status: str                      # "rewritten" or "skipped"
    form: str | None                 # the form emitted ("auto" when it is chosen at run time), None if skipped
    family: str | None               # the HF model type, e.g. deepseek_v3
    shapes: dict[str, Any]           # B, H, S, T, r, dr, dn, dv, k (symbolic sizes as strings)
    reason: str                      # why this form, or why the region was left alone
    core: str | None = None          # "eager" or "sdpa": which HF attention core was matched
    dtype: str | None = None
    costs: dict[str, float] = field(default_factory=dict)        # form -> predicted seconds
    expressions: dict[str, str] = field(default_factory=dict)    # form -> sympy time expression
    crossover: str | None = None     # closed form of the decision boundary, when shapes are dynamic
    device: dict[str, Any] = field(default_factory=dict)         # roofline figures used
    graph: int | None = None         # which compiled graph (the backend's counter)
    flags: dict[str, bool] = field(default_factory=dict)         # the plan's causal / mask flags
    runs: dict[str, int] = field(default_factory=dict)           # form "auto": calls per form that ran so far

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompileTimes:
    graph: int                       # the backend's counter, as in RewriteRecord.graph
    regions: int = 0                 # MLA regions found in it (rewritten or left alone)
    match_s: float = 0.0             # finding the regions and the near misses
    decide_s: float = 0.0            # the cost model's decisions
    rewrite_s: float = 0.0           # rewriting the regions and re-checking the graph
    inductor_s: float | None = None  # Inductor's compile of the rewritten graph (None: remainder="eager")
    # the first decode step over a cache that grows by concatenation: Inductor's compile waits for the
    # graph's second call, which a generate() loop never makes (see backend.first_step_of_growing_cache)
    deferred: bool = False

    def describe(self) -> str:
        ours = self.match_s + self.decide_s + self.rewrite_s
        text = (f"graph {self.graph}: {self.regions} region(s), our passes {ours:.2f} s (matching {self.match_s:.2f}, "
                f"cost model {self.decide_s:.2f}, rewrite {self.rewrite_s:.2f})")
        if self.inductor_s is not None:
            text += f", Inductor {self.inductor_s:.2f} s"
            if self.deferred:
                text += " at its second call"
        elif self.deferred:
            text += (", Inductor deferred to its second call (the first decode step over a cache that grows by "
                     "concatenation: the next step is traced again with a dynamic length)")
        return text


_COMPILES: list[CompileTimes] = []


def record_compile(times: CompileTimes) -> None:
    with _LOCK:
        _COMPILES.append(times)
    logger.info("compile time of %s", times.describe())


def compile_times() -> list[CompileTimes]:
    """One entry per graph compiled since import or since `reset()`, oldest first."""
    with _LOCK:
        return list(_COMPILES)


def record(rec: RewriteRecord, log_path: str | None = None) -> None:
    with _LOCK:
        _RECORDS.append(rec)
    path = log_path or os.environ.get("MLA_COMPILE_LOG")
    if path:
        with _LOCK, open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec.to_json(), default=str) + "\n")
    if rec.status == "rewritten":
        logger.info("rewrote %s (%s) as %s: %s", rec.module, rec.family, rec.form, rec.reason)
    else:
        logger.info("left %s (%s) alone: %s", rec.module, rec.family, rec.reason)
    _emit_trace_artifact(rec)


def _emit_trace_artifact(rec: RewriteRecord) -> None:
    """Put the record in TORCH_TRACE's structured log, so tlparse shows it beside Inductor's output."""
    try:
        from torch._logging import trace_structured
    except ImportError:  # pragma: no cover - older torch
        return
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "mla_compile_rewrite", "encoding": "json"},
        payload_fn=lambda: json.dumps(rec.to_json(), default=str),
    )


def rewrite_log() -> list[RewriteRecord]:
    """The records made since import or since `reset()`, oldest first."""
    with _LOCK:
        return list(_RECORDS)


def reset() -> None:
    """Forget the records and compile times (compiled graphs and their plans are unaffected)."""
    with _LOCK:
        _RECORDS.clear()
        _COMPILES.clear()


def format_seconds(seconds: float) -> str:
    """A predicted time as the log shows it (in the costs column and in the reasons)."""
    return f"{seconds * 1e6:.1f}us" if seconds < 1e-3 else f"{seconds * 1e3:.2f}ms"


def format_rewrite_log(records: list[RewriteRecord] | None = None) -> str:
    """A table of one row per region and graph (module, family, status, form, shapes, the reason),
    then each distinct run-time crossover once, then the compile times of the graphs in the table.
    The predicted costs are in the reasons of static decisions; every field, expressions included, is
    in the records (`--json`, the JSON-lines log)."""
    recs = rewrite_log() if records is None else records
    if not recs:
        return "mla_compile: no MLA attention region has been compiled yet"
    rows = [("graph", "module", "family", "status", "form", "shapes", "reason")]
    crossovers: dict[str, list[RewriteRecord]] = {}
    for r in recs:
        shapes = " ".join(f"{k}={v}" for k, v in r.shapes.items() if v is not None)
        reason = r.reason
        if r.form == "auto":
            ran = ", ".join(f"{f} x{n}" for f, n in sorted(r.runs.items())) or "no call yet"
            reason = f"chosen per call on the predicted times (crossover below); ran: {ran}"
            if r.crossover:
                crossovers.setdefault(r.crossover, []).append(r)
        rows.append((str(r.graph), r.module, r.family or "?", r.status, r.form or "-", shapes,
                     reason.replace("\n", "; ")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    for text, where in crossovers.items():
        graphs = ", ".join(sorted({str(r.graph) for r in where}))
        lines += ["", f"crossover (graph {graphs}, {len(where)} region(s)):", "  " + text.replace("\n", "\n  ")]
    shown = {r.graph for r in recs}
    times = [t for t in compile_times() if t.graph in shown]
    if times:
        lines += ["", "compile time (Dynamo's tracing and the first run's kernel compiles come on top):"]
        lines += ["  " + t.describe() for t in times]
    return "\n".join(lines)
