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

`run_linalg(text, *tensors)` compiles a linalg-on-tensors module to LLVM with torch-mlir's reference
CPU pipeline and the MLIR ExecutionEngine (both in the torch-mlir wheel) and runs it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import itertools
import logging
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


def _decomposition_table() -> dict:
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    table = dict(get_decomposition_table())
    table[torch.ops.aten.isfinite.default] = _isfinite
    return table


def lower(cap: Capture, output_type: str = "torch", decompose: bool | None = None) -> MLIRExport:
    """Export a Capture to MLIR text of `output_type` (see the module docstring)."""
    _require_torch_mlir()
    from torch_mlir import fx as tm_fx

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
    prog = torch.export.export(module, cap.user_inputs, strict=False)
    prog = prog.run_decompositions(_decomposition_table())
    ot = "raw" if (output_type == "torch" and not decompose) else output_type
    with _quiet_warnings():
        mod = tm_fx.export_and_import(prog, output_type=ot, decomposition_table={}, func_name="main")
    return MLIRExport(str(mod), output_type, list(cap.records), decompose)


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


def export_all(model: torch.nn.Module, *args, output_types: Sequence[str] = OUTPUT_TYPES, form: str = "auto",
               cost_device: str | None = None, **kwargs) -> dict[str, MLIRExport | Exception]:
    """Capture once, lower to each output type; a failed lowering maps to its exception."""
    cap = capture(model, *args, form=form, cost_device=cost_device, **kwargs)
    out: dict[str, MLIRExport | Exception] = {}
    for ot in output_types:
        try:
            out[ot] = lower(cap, ot)
        except Exception as e:  # noqa: BLE001 - reported per output type
            log.warning("export_mlir: %s failed: %s", ot, str(e).strip().splitlines()[0] if str(e) else e)
            out[ot] = e
    return out


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
