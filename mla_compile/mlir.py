"""MLIR export through torch-mlir, with the MLA regions rewritten as the backend would rewrite them.

    text = mla_compile.export_mlir(model, input_ids, output_type="linalg-on-tensors", form="auto")

How: Dynamo captures the model's forward on the given arguments (static shapes, one graph), the
backend's own pass (`mla_compile.backend.rewrite_graph`) rewrites every MLA region into
`torch.ops.mla.<form>`, and the rewritten graph is exported (`torch.export`, parameters and buffers
frozen as constants) and imported with `torch_mlir.fx.export_and_import`.

- output_type="torch": by default the MLA ops stay named ops (`torch.operator "torch.mla.absorbed"`)
  in the torch dialect as imported (torch-mlir's backend-contract pipeline rejects unknown ops, so
  this is the importer's output, not the backend contract); `decompose=True` gives the backend
  contract with the forms decomposed.
- "linalg-on-tensors", "stablehlo", "tosa": each MLA op is replaced by its plain-torch reference
  (`mla_compile.passes.forms.reference_for`) before export, so what lowers is the absorbed (or sparse,
  or expanded) computation itself, never HF's expansion. Triton kernels are never traced.

With form="auto" the cost model decides on the static shapes (there is no `mla.auto` here).
A cache the model would create for itself is not part of the export: `use_cache=False` is passed
unless the caller passes use_cache. Tensor arguments (positional, then keyword in the order given)
become the arguments of the exported function; everything else is baked in.

An op that torch-mlir cannot lower (it imports it as an opaque `torch.operator`) raises
`MLIRExportError` naming the op and the model code it came from, before any lowering runs.
`export_mlir_regions(...)` exports each rewritten attention region alone (the MLA op and its input
tensors as the function's arguments), which needs nothing else of the model to lower. HF's MoE
router counts tokens per expert with `aten.histc`; it is decomposed here (exactly, for fixed and for
data-derived ranges), so MoE models lower whole too.

`run_linalg(text, *tensors)` compiles a linalg-on-tensors module to LLVM with torch-mlir's reference
CPU pipeline and the MLIR ExecutionEngine (both in the torch-mlir wheel) and runs it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import itertools
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("mla_compile")

OUTPUT_TYPES = ("torch", "linalg-on-tensors", "stablehlo", "tosa")
EXPORT_FORMS = ("auto", "expanded", "absorbed", "sparse", "sparse_absorbed", "sparse_expanded")
_GRAPH_IDS = itertools.count(10_000)


@dataclass
class Capture:
    """A rewritten Dynamo graph of one forward call, ready to export."""

    gm: fx.GraphModule
    example_inputs: list            # what Dynamo passes the graph: user tensors, parameters, buffers
    user_inputs: tuple              # the caller's tensors, in the exported function's argument order
    records: list = field(default_factory=list)   # RewriteRecords of the export's rewrite
    form: str = "auto"

    def forms(self) -> list[str]:
        return [r.form for r in self.records if r.status == "rewritten"]


@dataclass
class MLIRExport:
    text: str
    output_type: str
    records: list
    decomposed: bool


def _require_torch_mlir():
    try:
        import torch_mlir.fx  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("export_mlir needs torch-mlir (pip install 'mla-compile[mlir]'; wheels exist "
                          "for some Python/torch pairs only)") from e


def _user_tensors(args: Sequence, kwargs: dict) -> tuple:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tuple(tensors)


def capture(model: torch.nn.Module, *args, form: str = "auto", cost_device: str | None = None,
            **kwargs) -> Capture:
    """Dynamo-capture model(*args, **kwargs) as one static graph and rewrite its MLA regions."""
    import mla_compile.passes.dispatch  # noqa: F401  (registers torch.ops.mla.auto)
    import mla_compile.passes.forms  # noqa: F401  (registers torch.ops.mla.<form>)
    from mla_compile.backend import Options, rewrite_graph

    if form not in EXPORT_FORMS:
        raise ValueError(f"export_mlir: unknown form {form!r}; expected one of {EXPORT_FORMS}")
    kwargs.setdefault("use_cache", False)
    got: dict = {}
    graph_id = next(_GRAPH_IDS)

    def backend(gm, example_inputs):
        if got:
            raise RuntimeError("export_mlir: the forward was captured as more than one graph")
        got["records"] = rewrite_graph(gm, Options(form=form, device=cost_device), graph_id)
        got["gm"], got["inputs"] = gm, list(example_inputs)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    limit = dict(recompile_limit=1 << 20) if hasattr(torch._dynamo.config, "recompile_limit") else {}
    with torch._dynamo.config.patch(**limit), torch.no_grad():
        compiled(*args, **kwargs)
    if not got:
        raise RuntimeError("export_mlir: Dynamo captured no graph (was this forward compiled already "
                           "with these exact arguments?)")
    gm = got["gm"]
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is getattr(torch.ops.mla, "auto").default:
            raise RuntimeError("export_mlir: a dynamic-shape mla.auto op in a static capture")
    return Capture(gm, got["inputs"], _user_tensors(args, kwargs), got["records"], form)


class _Exportable(torch.nn.Module):
    """The captured graph as a module of the caller's tensors; parameters and buffers held as buffers
    (frozen into the MLIR as constants)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, user_inputs: tuple):
        super().__init__()
        self.gm = gm
        self._slots: list[tuple[str, Any]] = []
        for i, e in enumerate(example_inputs):
            j = next((j for j, a in enumerate(user_inputs) if a is e), None)
            if j is not None:
                self._slots.append(("arg", j))
            elif isinstance(e, torch.Tensor):
                self.register_buffer(f"const{i}", e.detach(), persistent=True)
                self._slots.append(("const", f"const{i}"))
            else:
                self._slots.append(("value", e))

    def forward(self, *args):
        ins = [args[v] if k == "arg" else getattr(self, v) if k == "const" else v for k, v in self._slots]
        out = self.gm(*ins)
        if isinstance(out, (tuple, list)) and len(out) == 1:
            return out[0]
        return out


def _decompose_mla_ops(gm: fx.GraphModule) -> int:
    """Replace each torch.ops.mla.<form> call by the form's plain-torch reference (same arguments)."""
    from mla_compile.passes.forms import FORMS, reference_for

    ops = {getattr(torch.ops.mla, f).default: _reference_call(f, reference_for(f)) for f in FORMS}
    n_done = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ops:
            n.target = ops[n.target]
            n_done += 1
    gm.recompile()
    return n_done


_N_ARGS = {"expanded": 9, "absorbed": 9, "sparse_absorbed": 10, "sparse_expanded": 10}


def _reference_call(form: str, ref):
    """The reference with the op's calling convention. Trailing optional op arguments the reference
    does not take (a dense op's kv_lens, for a static cache) are dropped: the mask the op also
    receives already hides every key past them, so the result is the same, only not shortened."""
    n = _N_ARGS[form]

    def call(*args):
        return ref(*args[:n])

    call.__name__ = f"mla_{form}_reference"
    return call


def _isfinite(x):
    # torch-mlir has no linalg lowering for aten.isfinite (the forms' softmax guards on it)
    if not x.is_floating_point():
        return torch.ones_like(x, dtype=torch.bool)
    return torch.logical_and(x == x, x.abs() != float("inf"))


def _histc(x, bins: int = 100, min: float = 0, max: float = 0):
    """aten.histc as comparisons and a sum (torch-mlir has no lowering for it). Same bins as ATen's
    CPU kernel: bin = floor((x - lo) * bins / (hi - lo)), x == hi in the last bin, values outside
    [lo, hi] not counted; min == max takes the data's range (widened by 1 each way if it is one value)."""
    if min == max:
        lo, hi = x.min(), x.max()
        same = lo == hi
        lo, hi = torch.where(same, lo - 1, lo), torch.where(same, hi + 1, hi)
    else:
        lo, hi = min, max
    flat = x.reshape(-1)
    pos = torch.floor((flat - lo) * bins / (hi - lo)).to(torch.int64).clamp(0, bins - 1)
    inside = (flat >= lo) & (flat <= hi)
    hits = (pos.unsqueeze(-1) == torch.arange(bins, device=x.device)) & inside.unsqueeze(-1)
    return hits.sum(0).to(x.dtype)


def _grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """Grouped matmul as one batched matmul (torch-mlir lowers neither aten._grouped_mm nor
    transformers' opaque fallback): rows are sorted by group and offs[g] is the end of group g, so
    row r belongs to the number of ends <= r; out[r] = mat_a[r] @ mat_b[group(r)], and rows past the
    last end stay zero, as in the fallback."""
    rows = torch.arange(mat_a.shape[0], device=mat_a.device)
    ends = offs.to(torch.int64)
    group = (rows.unsqueeze(-1) >= ends.unsqueeze(0)).sum(-1)
    inside = group < mat_b.shape[0]
    group = group.clamp(max=mat_b.shape[0] - 1)
    out = torch.bmm(mat_a.unsqueeze(1), mat_b[group]).squeeze(1)
    if bias is not None:
        out = out + bias[group]
    out = torch.where(inside.unsqueeze(-1), out, torch.zeros_like(out))
    return out.to(out_dtype) if out_dtype is not None else out


def _topk(x, k, dim=-1, largest=True, sorted=True):
    """topk as the first k of a sort (torch-mlir lowers topk only with sorted=True; with
    sorted=False the order is unspecified, so the sorted order is one of its valid results)."""
    values, indices = torch.sort(x, dim=dim, descending=largest)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def _stable_sort(x, stable=None, dim=-1, descending=False):
    """A stable sort from comparisons (torch-mlir lowers no stable sort): element i goes to the
    number of elements before it in the order, ties broken by position; exact for any dtype without
    NaN. Quadratic in the sorted length, which at export sizes (MoE routing of a prompt) is small."""
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    mine, other = moved.unsqueeze(-1), moved.unsqueeze(-2)
    pos = torch.arange(n, device=x.device)
    ahead = (other > mine) if descending else (other < mine)
    tied_ahead = (other == mine) & (pos.unsqueeze(0) < pos.unsqueeze(-1))
    rank = (ahead | tied_ahead).to(torch.int64).sum(-1)
    order = torch.scatter(torch.zeros_like(rank), -1, rank, pos.expand_as(rank).contiguous())
    return moved.gather(-1, order).movedim(-1, dim), order.movedim(-1, dim)


def _decomposition_table() -> dict:
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    table = dict(get_decomposition_table())
    table[torch.ops.aten.isfinite.default] = _isfinite
    # what HF's MoE layers call (its router's token counts; its experts' grouped matmuls)
    table[torch.ops.aten.histc.default] = _histc
    table[torch.ops.aten._grouped_mm.default] = _grouped_mm
    table[torch.ops.aten.topk.default] = _topk
    table[torch.ops.aten.sort.stable] = _stable_sort
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        table[transformers_ops.grouped_mm_fallback.default] = _grouped_mm
    return table


class MLIRExportError(RuntimeError):
    """The graph holds ops torch-mlir cannot lower; the message names each and where it came from."""


_OPAQUE_OP_RE = re.compile(r'torch\.operator "torch\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)')


def _unlowerable_ops(raw_text: str) -> list[str]:
    """Ops the importer could only keep as an opaque `torch.operator` ("aten.histc",
    "transformers.grouped_mm_fallback"): torch-mlir has no definition, hence no lowering, for them."""
    return sorted({f"{m.group(1)}.{m.group(2)}" for m in _OPAQUE_OP_RE.finditer(raw_text)})


def _origins(gm: fx.GraphModule, qualified_op: str) -> list[str]:
    """Where the captured graph calls `qualified_op` ("aten.special_zeta", "transformers.x"): the
    module path and the last line of the model's code."""
    from mla_compile.passes.match import module_of

    op = qualified_op.split(".", 1)[1]
    found = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        qualified = f"{getattr(n.target, '__module__', '') or ''}.{name}".replace("torch.", "").replace(".", "_")
        if name != op and not qualified.endswith(op) and str(n.target) != qualified_op + ".default":
            continue
        where = module_of(n)[0]
        frames = [ln.strip() for ln in (n.meta.get("stack_trace") or "").splitlines() if ln.strip().startswith("File")]
        found.append(f"{where} ({frames[-1]})" if frames else where)
    return found


def _check_lowerable(raw_text: str, cap: "Capture", output_type: str) -> None:
    ops = _unlowerable_ops(raw_text)
    if not ops:
        return
    lines = []
    for op in ops:
        origins = _origins(cap.gm, op)
        shown = "; ".join(origins[:3]) + (f"; and {len(origins) - 3} more" if len(origins) > 3 else "")
        lines.append(f"  {op}: from {shown or 'the model (no matching call found in the captured graph)'}")
    raise MLIRExportError(
        f"torch-mlir cannot lower to {output_type!r}: it has no lowering for\n" + "\n".join(lines)
        + "\nThe rewritten attention alone still exports: mla_compile.mlir.export_mlir_regions(model, ...)"
          " (one module per MLA region), or output_type=\"torch\" keeps these ops as torch.operator.")


def lower(cap: Capture, output_type: str = "torch", decompose: bool | None = None) -> MLIRExport:
    """Export a Capture to MLIR text of `output_type` (see the module docstring)."""
    _require_torch_mlir()
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"export_mlir: unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
    if decompose is None:
        decompose = output_type != "torch"
    if not decompose and output_type != "torch":
        raise ValueError(f"output_type={output_type!r} needs the MLA ops decomposed (decompose=True): "
                         "torch-mlir does not lower unknown custom ops")
    gm = copy.deepcopy(cap.gm)
    if decompose:
        _decompose_mla_ops(gm)
    module = _Exportable(gm, cap.example_inputs, cap.user_inputs)
    text = _import(module, cap.user_inputs, output_type, decompose, cap)
    return MLIRExport(text, output_type, list(cap.records), decompose)


def _import(module: torch.nn.Module, inputs: tuple, output_type: str, decompose: bool, cap: "Capture") -> str:
    """torch.export the module, then import it with torch-mlir (raw first: an op it cannot lower is
    an MLIRExportError naming it, instead of the pass pipeline's diagnostics)."""
    from torch_mlir import fx as tm_fx

    prog = torch.export.export(module, inputs, strict=False)
    prog = prog.run_decompositions(_decomposition_table())
    with _quiet_warnings():
        raw = str(tm_fx.export_and_import(prog, output_type="raw", decomposition_table={}, func_name="main"))
        if output_type == "torch" and not decompose:
            return raw
        _check_lowerable(raw, cap, output_type)
        return str(tm_fx.export_and_import(prog, output_type=output_type, decomposition_table={}, func_name="main"))


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def export_mlir(model: torch.nn.Module, *args, output_type: str = "torch", form: str = "auto",
                decompose: bool | None = None, cost_device: str | None = None, **kwargs) -> str:
    """MLIR text of model(*args, **kwargs) with its MLA regions rewritten.

    output_type: "torch" | "linalg-on-tensors" | "stablehlo" | "tosa".
    form: "auto" (the cost model's static decision, as the backend would choose) or a forced form:
      "expanded" | "absorbed" | "sparse" (sparse_absorbed on DSA regions, absorbed elsewhere) |
      "sparse_absorbed" | "sparse_expanded".
    decompose: replace the MLA ops by their computation (default: True except for "torch", where
      they stay `torch.operator "torch.mla.<form>"`).
    cost_device: the cost model's device for form="auto" (a table name such as "h200"; default cpu).
    kwargs go to the model (use_cache=False unless given).
    """
    cap = capture(model, *args, form=form, cost_device=cost_device, **kwargs)
    return lower(cap, output_type, decompose).text


def export_mlir_regions(model: torch.nn.Module, *args, output_type: str = "torch", form: str = "auto",
                        decompose: bool | None = None, cost_device: str | None = None,
                        **kwargs) -> dict[str, str]:
    """MLIR text of each rewritten MLA region alone, by module name ("model.layers.0.self_attn").

    Each module's `main` takes the region's tensors as the MLA op receives them (query parts, latent,
    RoPE key, W_UK, W_UV, mask, ... in the op's order) and returns its output; the rest of the model
    is not in it, so an op elsewhere that torch-mlir cannot lower does not stop it. Same arguments
    as export_mlir."""
    cap = capture(model, *args, form=form, cost_device=cost_device, **kwargs)
    return {name: lower_region(cap, region, output_type, decompose) for name, region in regions(cap).items()}


@dataclass
class Region:
    """One MLA op call of a Capture, with the arguments it received on the captured call."""

    node: fx.Node
    args: tuple


def regions(cap: Capture) -> dict[str, Region]:
    """The captured graph's MLA op calls by module name, with their arguments (one run of the graph)."""
    from mla_compile.passes.forms import FORMS
    from mla_compile.passes.match import module_of

    ops = {getattr(torch.ops.mla, f).default for f in FORMS}
    seen: dict[fx.Node, tuple] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_function" and n.target in ops:
                seen[n] = tuple(self.fetch_args_kwargs_from_env(n)[0])
            return super().run_node(n)

    with torch.no_grad():
        _Recorder(cap.gm).run(*cap.example_inputs)
    out: dict[str, Region] = {}
    for node, node_args in seen.items():
        name = module_of(node)[0]
        key, i = name, 1
        while key in out:
            i += 1
            key = f"{name}#{i}"
        out[key] = Region(node, node_args)
    return out


class _RegionModule(torch.nn.Module):
    """One MLA op call as a module of its tensor arguments (non-tensor arguments baked in)."""

    def __init__(self, target, args: tuple):
        super().__init__()
        self.target, self.template = target, args

    def forward(self, *tensors):
        it = iter(tensors)
        return self.target(*[next(it) if isinstance(a, torch.Tensor) else a for a in self.template])


def lower_region(cap: Capture, region: Region, output_type: str = "torch", decompose: bool | None = None) -> str:
    """MLIR text of one region (see export_mlir_regions)."""
    from mla_compile.passes.forms import FORMS, reference_for

    _require_torch_mlir()
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"export_mlir: unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
    if decompose is None:
        decompose = output_type != "torch"
    target = region.node.target
    if decompose:
        form = next(f for f in FORMS if getattr(torch.ops.mla, f).default is target)
        target = _reference_call(form, reference_for(form))
    tensors = tuple(a for a in region.args if isinstance(a, torch.Tensor))
    return _import(_RegionModule(target, region.args), tensors, output_type, decompose, cap)


# --------------------------------------------------------------------------------------------- #
# Inspecting and running the MLIR
# --------------------------------------------------------------------------------------------- #

def _context():
    """A context that knows every dialect torch-mlir's lowerings emit (torch, and tm_tensor, which
    torch-mlir registers only as a dependent dialect of its passes: running one loads it)."""
    from torch_mlir import ir, passmanager
    from torch_mlir.dialects import torch as torch_d

    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    with ctx:
        passmanager.PassManager.parse("builtin.module(func.func(tm-tensor-bufferize))").run(
            ir.Module.parse("module {}").operation)
    return ctx


def parse(text: str):
    """The MLIR text as a torch_mlir.ir.Module (in a context with torch-mlir's dialects)."""
    _require_torch_mlir()
    from torch_mlir import ir

    with _context():
        return ir.Module.parse(text)


def verify(text: str) -> bool:
    """Parse the module and run the MLIR verifier (raises on failure)."""
    mod = parse(text)
    with mod.context:
        return bool(mod.operation.verify())


def tensor_shapes(text: str) -> set[tuple[int, ...]]:
    """Every static tensor shape in the text: builtin `tensor<AxBxf32>` and torch `!torch.vtensor<[A,B],f32>`."""
    import re

    shapes = set()
    for m in re.finditer(r"tensor<((?:\d+x)*)[a-z]", text):
        dims = m.group(1).rstrip("x")
        shapes.add(tuple(int(d) for d in dims.split("x")) if dims else ())
    for m in re.finditer(r"vtensor<\[([\d,]*)\]", text):
        shapes.add(tuple(int(d) for d in m.group(1).split(",")) if m.group(1) else ())
    return shapes


def expanded_kv_shapes(text: str, *, B: int, T: int, H: int, dn: int, dv: int) -> set[tuple[int, ...]]:
    """Tensors in the text with the expanded key/value width over the sequence: kv_b_proj applied to
    the latent ([.., T, H*(dn+dv)], [.., T, H*dn], flattened [B*T, ..]) or its per-head views
    ([.., T, H, dn(+dv)], [B, H, T, dn+dv]). [B, H, T, dn] alone is not listed: at prefill (S == T)
    the query's no-RoPE part has that shape too; the flat widths are the unambiguous sign."""
    rows = {T, B * T}
    widths = {H * (dn + dv), H * dn}
    found = set()
    for s in tensor_shapes(text):
        if len(s) >= 2 and s[-1] in widths and any(d in rows for d in s[:-1]):
            found.add(s)
        if len(s) >= 3 and s[-3:] in ((T, H, dn), (T, H, dn + dv)):
            found.add(s)
        if len(s) == 4 and s == (B, H, T, dn + dv):
            found.add(s)
    return found


_RUN_PIPELINE = ",".join([
    "func.func(linalg-generalize-named-ops)", "func.func(linalg-fuse-elementwise-ops)",
    "convert-shape-to-std", "func.func(refback-generalize-tensor-pad)",
    "func.func(refback-generalize-tensor-concat)", "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "refback-mlprogram-bufferize", "inline",  # no deallocation: a test runner may leak
    "refback-munge-calling-conventions", "func.func(tm-tensor-to-loops)",
    "func.func(refback-munge-memref-copy)", "func.func(convert-linalg-to-loops)", "func.func(lower-affine)",
    "convert-scf-to-cf", "func.func(refback-expand-ops-for-llvm)", "func.func(arith-expand)",
    "func.func(convert-math-to-llvm)", "convert-math-to-libm", "expand-strided-metadata",
    "finalize-memref-to-llvm", "lower-affine", "convert-bufferization-to-memref", "finalize-memref-to-llvm",
    "func.func(convert-arith-to-llvm)", "convert-vector-to-llvm", "convert-func-to-llvm", "convert-cf-to-llvm",
    "convert-complex-to-llvm", "reconcile-unrealized-casts",
])


def runner_available() -> str | None:
    """None when run_linalg can run here, else why not."""
    try:
        from torch_mlir import ir, passmanager
        from torch_mlir.execution_engine import ExecutionEngine  # noqa: F401
        from torch_mlir.runtime import get_unranked_memref_descriptor  # noqa: F401
    except ImportError as e:
        return f"torch-mlir's ExecutionEngine or runtime is missing: {e}"
    try:
        with ir.Context():
            passmanager.PassManager.parse("builtin.module(refback-munge-calling-conventions)")
    except Exception as e:  # noqa: BLE001
        return f"torch-mlir's reference-backend passes are not registered: {e}"
    return None


_NP_OF_MEMREF = {"mrf16": "float16", "mrf32": "float32", "mrf64": "float64", "mri1": "bool", "mri8": "int8",
                 "mri32": "int32", "mri64": "int64"}


def run_linalg(text: str, *inputs: torch.Tensor, func: str = "main") -> list[torch.Tensor]:
    """Compile a linalg-on-tensors module with torch-mlir's reference CPU pipeline and run `func`."""
    import numpy as np
    from torch_mlir.compiler_utils import run_pipeline_with_repro_report
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.runtime import UnrankedMemRefDescriptor, get_unranked_memref_descriptor, unranked_memref_to_numpy

    mod = parse(text)
    run_pipeline_with_repro_report(mod, f"builtin.module({_RUN_PIPELINE})", "linalg-on-tensors -> LLVM (reference CPU pipeline)")
    prefix = "refbackend_consume_func_return_"
    with mod.context:
        names = [str(op.attributes["sym_name"]).strip('"') for op in mod.body]
    engine = ExecutionEngine(mod)
    results: list = []
    keep = []
    for name in names:
        if not name.startswith(prefix):
            continue
        kinds = name[len(prefix):].split("_")
        if any(k not in _NP_OF_MEMREF for k in kinds):
            continue

        def consume(*ptrs, _kinds=kinds):
            results.append([unranked_memref_to_numpy(p, np.dtype(_NP_OF_MEMREF[k])).copy()
                            for p, k in zip(ptrs, _kinds)])

        cb = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(UnrankedMemRefDescriptor)] * len(kinds))(consume)
        keep.append(cb)
        engine.register_runtime(name, cb)
    arrays = [t.detach().cpu().contiguous().numpy() for t in inputs]
    ffi = [ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(a))) for a in arrays]
    engine.invoke(func, *ffi)
    if not results:
        raise RuntimeError("run_linalg: the function returned nothing")
    return [torch.from_numpy(a) for a in results[-1]]
