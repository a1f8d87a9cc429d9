"""Each form's op against an independent float64 reference (tests/reference.py), on random inputs."""

from __future__ import annotations

import re
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mla_compile.passes.forms import DENSE_FORMS, FORMS, SPARSE_FORMS, op_for, reference_for
from tests.helpers.reference import naive_mla, random_inputs

TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def call(form, a, scale, is_causal, fn=None):
    """`form`'s op on the inputs `a`, or `fn`, another implementation with the op's arguments."""
    fn = fn or op_for(form)
    head = (a["q_nope"], a["q_rope"], a["latent"], a["k_rope"], a["w_uk"], a["w_uv"])
    if form in SPARSE_FORMS:
        return fn(*head, a["topk_indices"], a["mask"], scale, is_causal)
    return fn(*head, a["mask"], scale, is_causal)


def rel_err(got, want):
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


SHAPES = [  # B, H, S, T, r, dr, dn, dv
    (1, 1, 1, 1, 8, 4, 8, 8),
    (2, 3, 1, 17, 16, 4, 8, 6),
    (2, 5, 4, 9, 32, 0, 16, 16),     # NoPE: dr = 0
    (3, 2, 7, 7, 16, 8, 8, 12),
]


@pytest.mark.parametrize("form", DENSE_FORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", ["none", "float", "bool", "causal"])
def test_dense_forms_match_reference(form, shape, mask):
    B, H, S, T, r, dr, dn, dv = shape
    a = random_inputs(*shape, mask="none" if mask == "causal" else mask, seed=zlib.crc32(repr((form, shape, mask)).encode()) % 1000)
    is_causal = mask == "causal"
    got = call(form, a, 0.3, is_causal)
    want = naive_mla(**a, scale=0.3, is_causal=is_causal)
    assert got.shape == (B, H, S, dv) and got.dtype == torch.float32
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("form", SPARSE_FORMS)
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("mask", ["none", "float", "causal"])
def test_sparse_forms_match_reference(form, shape, mask):
    B, H, S, T, r, dr, dn, dv = shape
    k = max(1, T // 2)
    a = random_inputs(*shape, mask="none" if mask == "causal" else mask, topk=k, seed=7)
    a["topk_indices"][0, 0, -1] = -1                     # "no token"
    is_causal = mask == "causal"
    if is_causal:   # keep every row alive: make key 0 (visible to all queries) the first selection
        idx = a["topk_indices"]
        has0 = idx == 0
        idx[has0] = idx[..., :1].expand_as(idx)[has0]   # swap key 0 to the front, keeping indices unique
        idx[..., 0] = 0
    got = call(form, a, 0.25, is_causal)
    want = naive_mla(**a, scale=0.25, is_causal=is_causal)
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", DENSE_FORMS + SPARSE_FORMS)
def test_half_precision_within_dtype_tolerance(form, dtype):
    shape = (2, 4, 3, 33, 32, 8, 16, 16)
    a = random_inputs(*shape, dtype=dtype, mask="float", topk=8 if form in SPARSE_FORMS else None, seed=3)
    got = call(form, a, 0.2, False)
    assert got.dtype == dtype
    assert rel_err(got, naive_mla(**a, scale=0.2)) < TOL[dtype]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), H=st.integers(1, 6), S=st.integers(1, 5), T=st.integers(1, 24),
       r=st.sampled_from([4, 16, 24]), dr=st.sampled_from([0, 2, 8]), dn=st.sampled_from([4, 8]),
       dv=st.sampled_from([4, 12]), causal=st.booleans(), seed=st.integers(0, 10_000))
def test_property_absorbed_equals_expanded_equals_reference(B, H, S, T, r, dr, dn, dv, causal, seed):
    a = random_inputs(B, H, S, T, r, dr, dn, dv, dtype=torch.float64, mask="float", seed=seed)
    want = naive_mla(**a, scale=0.5, is_causal=causal)
    if causal and S > T:
        want = want[:, :, :T]
    for form in DENSE_FORMS:
        got = call(form, a, 0.5, causal)
        got = got[:, :, :T] if causal and S > T else got
        assert rel_err(got, want) < 1e-10, form


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 5), S=st.integers(1, 4), T=st.integers(2, 30),
       dr=st.sampled_from([0, 4]), data=st.data())
def test_property_sparse_equals_dense_masked(B, H, S, T, dr, data):
    k = data.draw(st.integers(1, T))
    a = random_inputs(B, H, S, T, 16, dr, 8, 8, dtype=torch.float64, mask="float", topk=k,
                      seed=data.draw(st.integers(0, 10_000)))
    want = naive_mla(**a, scale=0.5)
    for form in SPARSE_FORMS:
        assert rel_err(call(form, a, 0.5, False), want) < 1e-10, form


def test_sparse_reads_only_selected_positions():
    """Values at unselected positions must not matter: poison them and the answer is unchanged."""
    a = random_inputs(2, 3, 4, 40, 16, 4, 8, 8, dtype=torch.float64, topk=5, seed=11)
    clean = call("sparse_absorbed", a, 0.5, False)
    sel = torch.zeros(2, 40, dtype=torch.bool)
    for b in range(2):
        sel[b, a["topk_indices"][b].long().flatten()] = True
    poisoned = dict(a, latent=a["latent"].clone(), k_rope=a["k_rope"].clone())
    poisoned["latent"][:, 0][~sel] = 1e6
    poisoned["k_rope"][:, 0][~sel] = float("nan")
    assert torch.equal(call("sparse_absorbed", poisoned, 0.5, False), clean)


BAD = [
    ("q_nope", lambda a: a.update(q_nope=a["q_nope"].int()), TypeError, "q_nope"),
    ("latent heads", lambda a: a.update(latent=a["latent"].expand(-1, 2, -1, -1)), ValueError, "latent"),
    ("w_uk shape", lambda a: a.update(w_uk=a["w_uk"][:, :-1]), ValueError, "w_uk"),
    ("k_rope len", lambda a: a.update(k_rope=a["k_rope"][:, :, :-1]), ValueError, "k_rope"),
    ("mask shape", lambda a: a.update(mask=torch.zeros(2, 1, 3, 5)), ValueError, "mask"),
    ("mask dtype", lambda a: a.update(mask=torch.zeros(2, 1, 4, 9, dtype=torch.int64)), TypeError, "mask"),
    ("index high", lambda a: a["topk_indices"].__setitem__((0, 0, 0), 9), ValueError, "topk_indices"),
    ("index low", lambda a: a["topk_indices"].__setitem__((0, 0, 0), -2), ValueError, "topk_indices"),
    ("index dtype", lambda a: a.update(topk_indices=a["topk_indices"].float()), TypeError, "topk_indices"),
]


@pytest.mark.parametrize("form", DENSE_FORMS + SPARSE_FORMS)
@pytest.mark.parametrize("name,spoil,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(form, name, spoil, exc, arg):
    a = random_inputs(2, 3, 4, 9, 16, 4, 8, 8, topk=3)
    if form not in SPARSE_FORMS and arg == "topk_indices":
        pytest.skip("dense forms take no indices")
    spoil(a)
    with pytest.raises(exc, match=arg):
        call(form, a, 0.5, False)


def on_kernel_device(fn):
    """fn run on the device the Triton kernels take (the CPU under the interpreter), its output on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(*args):
        return fn(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in args)).cpu()

    return run


def implementations(form):
    """[(name, fn)]: the op, the plain-torch reference and the form's Triton kernel where it has one."""
    pytest.importorskip("triton")
    from mla_compile.kernels.absorbed_decode import absorbed_decode
    from mla_compile.kernels.expanded_prefill import expanded_prefill
    from mla_compile.kernels.sparse_decode import sparse_absorbed_decode

    kernels = {"absorbed": absorbed_decode, "expanded": expanded_prefill, "sparse_absorbed": sparse_absorbed_decode}
    out = [("op", op_for(form)), ("reference", reference_for(form))]
    return out + ([("kernel", on_kernel_device(kernels[form]))] if form in kernels else [])


# Masks the forms refuse: torch aligns a mask with [B, H, S, T] scores from the right, so dim -3 is the
# head axis (the references would attend per head where the kernels' [B, 1, S, T] view cannot), and a
# mask wider than [B, 1, S, T] anywhere would widen the references' output and crash the kernels' view.
MASKS_REFUSED = [  # name, (B, H, S, T), mask shape
    ("per-head 3-D", (2, 3, 4, 9), (3, 4, 9)),
    ("batch-looking 3-D", (2, 3, 4, 9), (2, 4, 9)),     # [B, S, T]: torch reads its B as heads too
    ("per-head 4-D", (2, 3, 4, 9), (2, 3, 4, 9)),
    ("5-D", (2, 3, 4, 9), (1, 1, 1, 4, 9)),
    ("batch wider than B = 1", (1, 3, 4, 9), (2, 1, 4, 9)),
    ("queries wider than S = 1", (2, 3, 1, 9), (2, 1, 4, 9)),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,sizes,shape", MASKS_REFUSED, ids=[m[0] for m in MASKS_REFUSED])
def test_mask_the_kernels_would_read_otherwise_is_refused(form, name, sizes, shape):
    B, H, S, T = sizes
    a = random_inputs(B, H, S, T, 16, 4, 8, 8, topk=3, seed=5)
    a["mask"] = torch.zeros(shape)
    for impl, fn in implementations(form):
        with pytest.raises(ValueError, match=re.escape(f"mask: shape {shape}")) as err:
            call(form, a, 0.5, False, fn)
        assert f"[B={B}, 1, S={S}, T={T}]" in str(err.value), impl


MASKS_ACCEPTED = [  # name, mask shape at B, S, T = 2, 4, 9
    ("HF's 4-D", (2, 1, 4, 9)),
    ("4-D shared by the batch", (1, 1, 4, 9)),
    ("4-D padding row", (2, 1, 1, 9)),
    ("3-D", (1, 4, 9)),
    ("2-D", (4, 9)),
    ("1-D", (9,)),
]


def mask_of(shape, kind, seed):
    """A float additive mask, or a bool one (True = attend) that keeps key 0 of every row."""
    g = torch.Generator().manual_seed(seed)
    if kind == "float":
        return torch.randn(shape, generator=g) * 2
    m = torch.rand(shape, generator=g) > 0.3
    m[..., 0] = True
    return m


@pytest.mark.parametrize("form,kind", [(f, k) for f in DENSE_FORMS for k in ("float", "bool")]
                         + [(f, "float") for f in SPARSE_FORMS])    # a bool mask could hide every selected key
@pytest.mark.parametrize("name,shape", MASKS_ACCEPTED, ids=[m[0] for m in MASKS_ACCEPTED])
def test_masks_of_every_accepted_rank_match_reference(form, kind, name, shape):
    a = random_inputs(2, 3, 4, 9, 16, 4, 8, 8, topk=5 if form in SPARSE_FORMS else None, seed=len(shape))
    a["mask"] = mask_of(shape, kind, seed=zlib.crc32(repr((name, kind)).encode()) % 1000)
    want = naive_mla(**a, scale=0.5)
    for impl, fn in implementations(form):
        got = call(form, a, 0.5, False, fn)
        assert got.shape == (2, 3, 4, 8), impl
        assert rel_err(got, want) < TOL[torch.float32], impl
