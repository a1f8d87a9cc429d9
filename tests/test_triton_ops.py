"""The forms as `torch.library.triton_op`s: what a compiler sees when it traces them.

Traced for a compiler (AOTAutograd, then Inductor), a CUDA call with static sizes becomes its Triton
launches (`triton_kernel_wrapper_functional` nodes, which Inductor compiles as its own kernels); any
other call becomes the form's opaque twin `mla.<form>_opaque`. Both must give the reference's
answer, and the index range check of the sparse forms must survive tracing (`mla.checked_topk`).
The CPU half runs in CI (AOTAutograd with an eager forward, no Inductor); the CUDA half on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import mla_compile.passes.forms  # noqa: F401  (registers torch.ops.mla)
from mla_compile.passes.forms.absorbed import absorbed_reference
from mla_compile.passes.forms.expanded import expanded_reference
from mla_compile.passes.forms.sparse import sparse_absorbed_reference
from tests.helpers.reference import random_inputs

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def inputs(B, H, S, T, r, dr, dn, dv, dtype, device, seed, k=None):
    """tests.helpers.reference.random_inputs on `device`, as the ops' positional tensors; with k, top-k indices
    whose last column is -1 ("no token") in every row."""
    a = random_inputs(B, H, S, T, r, dr, dn, dv, dtype=dtype, topk=k, seed=seed)
    args = [a[n].to(device) for n in ("q_nope", "q_rope", "latent", "k_rope")]
    w = torch.cat([a["w_uk"], a["w_uv"]], 1).to(device)          # one tensor: W_UK and W_UV its halves
    args += [w[:, :dn], w[:, dn:]]
    if k is not None:
        idx = a["topk_indices"].clone()
        idx[..., -1] = -1
        args.append(idx.to(device))
    return args


def float64(args):
    return [a.double().cpu() if a.is_floating_point() else a.cpu() for a in args]


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


FORMS = {
    "absorbed": (absorbed_reference, None),
    "expanded": (expanded_reference, None),
    "sparse_absorbed": (sparse_absorbed_reference, 6),
}


def call(form):
    op = getattr(torch.ops.mla, form)

    def f(*args):
        return op(*args, None, 0.25, False)
    return f


def aot_forward_graph(fn, args, dynamic):
    """Compile fn through AOTAutograd (eager forward, no Inductor); return (output, forward graphs)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def forward(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=forward), fullgraph=True, dynamic=dynamic)(*args)
    return out, graphs


def targets(graphs):
    return {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dynamic", [False, True])
def test_traced_call_is_opaque_without_gpu_kernels(form, dynamic):
    """On the CPU (references, or the interpreter) a traced call is the opaque twin, and exact."""
    ref, k = FORMS[form]
    args = inputs(2, 3, 2, 11, 16, 8, 8, 8, torch.float32, "cpu", seed=5, k=k)
    out, graphs = aot_forward_graph(call(form), args, dynamic)
    assert f"mla.{form}_opaque.default" in targets(graphs), targets(graphs)
    assert not any("triton_kernel_wrapper" in t for t in targets(graphs))
    assert rel_err(out, ref(*float64(args), None, 0.25, False)) < 1e-5


def test_checked_topk():
    idx = torch.tensor([[[0, 4, -1]]], dtype=torch.int64)
    got = torch.ops.mla.checked_topk(idx, 5)
    assert got.dtype == torch.int32 and got.is_contiguous() and torch.equal(got.long(), idx)
    assert got.data_ptr() != idx.data_ptr()
    for bad in (5, -2):
        with pytest.raises(ValueError, match=r"topk_indices: values must lie in \[-1, T=5\)"):
            torch.ops.mla.checked_topk(torch.tensor([[[0, bad]]]), 5)
    torch.library.opcheck(torch.ops.mla.checked_topk.default, (idx, 5))


@pytest.mark.parametrize("form", list(FORMS))
def test_opaque_twin_opcheck(form):
    _, k = FORMS[form]
    args = inputs(1, 3, 2, 9, 16, 8, 8, 8, torch.float32, "cpu", seed=6, k=k)
    torch.library.opcheck(getattr(torch.ops.mla, f"{form}_opaque").default, (*args, None, 0.25, False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------------------------------------------
# CUDA: static sizes inline the Triton launches, symbolic sizes take the twin

V3_SMALL = dict(r=512, dr=64, dn=128, dv=128)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", list(FORMS))
def test_aot_trace_inlines_triton_launches_on_cuda(form):
    ref, k = FORMS[form]
    args = inputs(2, 16, 3, 300, **V3_SMALL, dtype=torch.bfloat16, device="cuda", seed=7, k=k and 64)
    out, graphs = aot_forward_graph(call(form), args, dynamic=False)
    t = targets(graphs)
    assert any("triton_kernel_wrapper" in x for x in t), t
    assert not any("_opaque" in x for x in t), t
    assert ("mla.checked_topk.default" in t) == (k is not None)
    assert rel_err(out, ref(*float64(args), None, 0.25, False)) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads", [64, 16])
def test_aot_trace_hands_hopper_gluon_calls_to_the_twin(heads):
    """On sm_90 one query takes a Gluon kernel (heads-major above 32 heads, keys-major at <= 32), which
    wrap_triton cannot trace: the traced call must be the opaque twin, and exact."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels run on Hopper only")
    ref, _ = FORMS["absorbed"]
    args = inputs(2, heads, 1, 300, **V3_SMALL, dtype=torch.bfloat16, device="cuda", seed=10)
    out, graphs = aot_forward_graph(call("absorbed"), args, dynamic=False)
    t = targets(graphs)
    assert any("absorbed_opaque" in x for x in t), t
    assert not any("triton_kernel_wrapper" in x for x in t), t
    assert rel_err(out, ref(*float64(args), None, 0.25, False)) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", list(FORMS))
def test_inductor_compiles_our_kernels_into_its_code(form):
    """Inductor's generated code launches our kernels itself; symbolic sizes call the twin, with no
    recompilation as T changes."""
    from torch._inductor.utils import run_and_get_code

    ref, k = FORMS[form]
    kernel = {"absorbed": "_absorbed_split_kernel", "expanded": "_expanded_fwd_kernel",
              "sparse_absorbed": "_sparse_split_kernel"}[form]
    args = inputs(2, 16, 3, 300, **V3_SMALL, dtype=torch.bfloat16, device="cuda", seed=8, k=k and 64)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(call(form), backend="inductor", fullgraph=True), *args)
    code = "\n".join(code)
    assert kernel in code and f"{form}_opaque" not in code
    assert rel_err(out, ref(*float64(args), None, 0.25, False)) < 2e-2

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(call(form), backend="inductor", fullgraph=True, dynamic=True)
    for T in (300, 517):
        a = inputs(2, 16, 3, T, **V3_SMALL, dtype=torch.bfloat16, device="cuda", seed=T, k=k and 64)
        out, code = run_and_get_code(fn, *a) if T == 300 else (fn(*a), None)
        if code is not None:
            assert f"{form}_opaque" in "\n".join(code)
        assert rel_err(out, ref(*float64(a), None, 0.25, False)) < 2e-2
    assert counters["stats"]["unique_graphs"] == 1


@gpu
@pytest.mark.gpu
def test_compiled_sparse_rejects_out_of_range_indices():
    args = inputs(2, 16, 3, 300, **V3_SMALL, dtype=torch.bfloat16, device="cuda", seed=9, k=64)
    torch._dynamo.reset()
    fn = torch.compile(call("sparse_absorbed"), backend="inductor", fullgraph=True)
    fn(*args)
    args[-1][1, 2, 0] = 300
    with pytest.raises(ValueError, match=r"T=300"):
        fn(*args)
