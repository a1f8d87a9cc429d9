"""Training through backend="mla".

* gradcheck (float64, small shapes) of every op's registered backward, for float / bool / causal
  masks, NoPE (dr = 0), and invalid (-1) and duplicated top-k indices for the sparse forms;
* torch.library.opcheck (schema, autograd registration, AOT dispatch with dynamic shapes) per op;
* mla.auto's backward follows the form its plan chose;
* model level: a tiny deepseek_v3 and deepseek_v32 in train() mode, loss.backward() through
  model.compile(backend="mla", options={"form": F}) gives every parameter gradient eager gives
  (float32, 1e-4 relative), for each form; once through Inductor (slow tier).
"""

from __future__ import annotations

import copy

import pytest
import torch

import mla_compile
import mla_compile.passes.forms.autograd  # noqa: F401  (registers the backward formulas)
from mla_compile.passes.forms import DENSE_FORMS, SPARSE_FORMS, op_for
from mla_compile.tiny import tiny_model
from tests.helpers.reference import random_inputs

DIFF = ("q_nope", "q_rope", "latent", "k_rope", "w_uk", "w_uv")


def _inputs(form, mask, dr=2, seed=1, shape=(2, 3, 3, 5, 4, None, 3, 2), duplicates=False):
    B, H, S, T, r, _, dn, dv = shape
    sparse = form in SPARSE_FORMS
    a = random_inputs(B, H, S, T, r, dr, dn, dv, dtype=torch.float64, mask="none" if mask == "causal" else mask,
                      topk=3 if sparse else None, seed=seed)
    if sparse:
        a["topk_indices"][0, 0, -1] = -1                     # "no token"
        if duplicates:
            a["topk_indices"][1, 1, 1] = a["topk_indices"][1, 1, 0]
        if mask == "causal":
            a["topk_indices"][..., 0] = 0                    # every query keeps key 0 (no empty row)
    return a


def _fn(form, a, scale, is_causal):
    extra = (a["topk_indices"],) if form in SPARSE_FORMS else ()
    return lambda *d: op_for(form)(*d, *extra, a["mask"], scale, is_causal)


@pytest.mark.parametrize("form", DENSE_FORMS + SPARSE_FORMS)
@pytest.mark.parametrize("mask,dr", [("float", 2), ("bool", 0), ("causal", 2)])
def test_gradcheck_float64(form, mask, dr):
    a = _inputs(form, mask, dr=dr, duplicates=True)
    diff = [a[n].clone().requires_grad_() for n in DIFF]
    assert torch.autograd.gradcheck(_fn(form, a, 0.7, mask == "causal"), diff, fast_mode=True)


@pytest.mark.parametrize("form", DENSE_FORMS + SPARSE_FORMS)
def test_backward_matches_reference_autograd(form):
    """The explicit formulas against torch.autograd through the plain-torch reference (tests/reference.py)."""
    from tests.helpers.reference import naive_mla

    a = _inputs(form, "float", dr=4, shape=(2, 4, 5, 9, 8, None, 6, 5))
    leaves = {n: a[n].clone().requires_grad_() for n in DIFF}
    extra = {"topk_indices": a["topk_indices"]} if form in SPARSE_FORMS else {}
    want_out = naive_mla(**leaves, mask=a["mask"], scale=0.4, **extra)
    g = torch.randn_like(want_out)
    want = torch.autograd.grad(want_out, list(leaves.values()), g)
    leaves2 = [a[n].clone().requires_grad_() for n in DIFF]
    got = torch.autograd.grad(_fn(form, a, 0.4, False)(*leaves2), leaves2, g)
    for name, x, y in zip(DIFF, got, want):
        assert x.shape == y.shape, name
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-11), (name, float((x - y).abs().max()))


@pytest.mark.parametrize("form", DENSE_FORMS + SPARSE_FORMS)
def test_opcheck(form):
    a = _inputs(form, "float")
    args = [a[n].clone().requires_grad_() for n in DIFF]
    args += ([a["topk_indices"]] if form in SPARSE_FORMS else []) + [a["mask"], 0.7, False]
    result = torch.library.opcheck(op_for(form), args,
                                   test_utils=("test_schema", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("form", DENSE_FORMS + SPARSE_FORMS)
def test_opcheck_fake_strides(form):
    """The fake function's output layout (contiguous) must be the real one's: Inductor plans the
    reads of the op's output from the fake strides."""
    a = _inputs(form, "float")
    args = [a[n] for n in DIFF] + ([a["topk_indices"]] if form in SPARSE_FORMS else []) + [a["mask"], 0.7, False]
    torch.library.opcheck(op_for(form), args, test_utils=("test_faketensor",))


def test_gradients_reach_kv_b_proj_weight_through_views():
    """w_uk / w_uv are views of kv_b_proj.weight (as the rewrite emits them): the parameter gets the grad."""
    a = _inputs("absorbed", "float", shape=(2, 3, 3, 5, 4, None, 3, 2))
    H, dn, r = a["w_uk"].shape
    dv = a["w_uv"].shape[1]
    weight = torch.randn(H * (dn + dv), r, dtype=torch.float64, requires_grad=True)
    w = weight.view(H, dn + dv, r)
    out = op_for("absorbed")(a["q_nope"], a["q_rope"], a["latent"], a["k_rope"], w[:, :dn], w[:, dn:],
                             a["mask"], 0.5, False)
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("forms", [("absorbed",), ("expanded",), ("sparse_absorbed",), ("sparse_expanded",)])
def test_auto_backward_follows_the_chosen_form(forms):
    from mla_compile.passes.dispatch import Chooser, register

    form = forms[0]
    plan_id = register(Chooser(lambda sizes: form, f"always {form}"))
    a = _inputs("sparse_absorbed", "float", dr=2)
    a["topk_indices"][..., 0] = 0
    diff = [a[n].clone().requires_grad_() for n in DIFF]
    fn = lambda *d: torch.ops.mla.auto(*d, a["topk_indices"], a["mask"], 0.6, False, plan_id)   # noqa: E731
    assert torch.autograd.gradcheck(fn, diff, fast_mode=True)


# --------------------------------------------------------------------------------------------- #
# model level
# --------------------------------------------------------------------------------------------- #
def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check_training(family, form, remainder="eager", tol=1e-4):
    model = tiny_model(family, seed=5, attention_dropout=0.0)
    model.train()
    twin = copy.deepcopy(model)
    twin.compile(backend="mla", options={"remainder": remainder, "form": form})
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=g)
    want_loss, want = _grads(model, ids)
    got_loss, got = _grads(twin, ids)
    rewritten = [r for r in mla_compile.rewrite_log() if r.status == "rewritten"]
    assert rewritten, "the training graph was not rewritten:\n" + mla_compile.format_rewrite_log()
    assert torch.allclose(got_loss, want_loss, rtol=tol, atol=0)
    compared = 0
    for name, w in want.items():
        gr = got[name]
        if w is None:
            assert gr is None or not gr.abs().any(), name
            continue
        assert gr is not None, f"{name}: no gradient under backend='mla'"
        err = float((gr.double() - w.double()).norm() / w.double().norm().clamp_min(1e-12))
        assert err < tol or float((gr - w).abs().max()) < 1e-9, f"{name}: relative error {err:.2e}"
        compared += 1
    assert any("kv_b_proj" in n for n in want if want[n] is not None)
    return compared


@pytest.mark.parametrize("form", ["auto", "expanded", "absorbed"])
def test_training_deepseek_v3_grads_match_eager(form):
    assert _check_training("deepseek_v3", form) > 10


@pytest.mark.parametrize("form", ["auto", "expanded", "absorbed", "sparse_absorbed", "sparse_expanded"])
def test_training_deepseek_v32_grads_match_eager(form):
    assert _check_training("deepseek_v32", form) > 10


@pytest.mark.slow
@pytest.mark.parametrize("family,form", [("deepseek_v3", "absorbed"), ("deepseek_v32", "sparse_absorbed")])
def test_training_through_inductor(family, form):
    assert _check_training(family, form, remainder="inductor") > 10
