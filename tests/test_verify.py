"""options={"verify": True} / MLA_COMPILE_VERIFY=1: the original region runs beside the
rewrite on the first calls; a disagreement raises with the errors of both against a float64 answer."""

from __future__ import annotations

import pytest
import torch

import mla_compile
import mla_compile.verify as verify
from mla_compile.passes.forms import ops
from mla_compile.tiny import tiny_model
from mla_compile.verify import VerificationError
from tests.helpers.e2e import compiled_twin, padded_batch, rel_err, run_steps


@pytest.fixture
def count_checks(monkeypatch):
    """Count the comparisons verify makes (so a passing test proves it actually compared)."""
    calls = []
    real = verify.compare

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(verify, "compare", counting)
    return calls


def _perturbed(form, how="scale"):
    real = ops._REFERENCES[form]

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        if how == "nan":
            out = out.clone()
            out[0, 0, -1, 0] = float("nan")
            return out
        return out * 1.05 + 1e-3

    return broken


def _run(model, twin, steps=2):
    ids, mask = padded_batch(model.config.vocab_size, length=6)
    dec = torch.randint(3, model.config.vocab_size, (2, steps), generator=torch.Generator().manual_seed(1))
    want = run_steps(model, ids, mask, dec)
    got = run_steps(twin, ids, mask, dec)
    return got, want


@pytest.mark.parametrize("family,form", [("deepseek_v3", "auto"), ("deepseek_v32", "sparse_absorbed")])
def test_verify_passes_on_a_correct_rewrite(family, form, count_checks, caplog):
    model = tiny_model(family, seed=1)
    twin = compiled_twin(model, verify=True, form=form)
    with caplog.at_level("WARNING", logger="mla_compile"):
        got, want = _run(model, twin)
    passed = [r.getMessage() for r in caplog.records if "matches the original" in r.getMessage()]
    assert passed and all("relative_error=" in m for m in passed), caplog.text   # one line per checked call
    assert all(rel_err(g, w) < 1e-4 for g, w in zip(got, want))
    assert any(r.status == "rewritten" for r in mla_compile.rewrite_log())
    assert count_checks, "verify never compared the rewrite with the original"


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_verify_raises_on_a_broken_rewrite(form, monkeypatch):
    monkeypatch.setitem(ops._REFERENCES, form, _perturbed(form))
    model = tiny_model("deepseek_v3", seed=1)
    twin = compiled_twin(model, verify=True, form=form)
    with pytest.raises(VerificationError) as info:
        _run(model, twin)
    msg = str(info.value)
    for figure in ("relative_error", "cosine_similarity", "wmape", "rewrite vs original"):
        assert figure in msg, msg
    # Both the rewrite's and HF's original errors against a float64 recomputation are reported,
    # and they say which one is wrong.
    assert "float64 recomputation" in msg and "original relative_error" in msg, msg
    rewrite_err = float(msg.split("float64 recomputation of the original graph: rewrite relative_error=")[1].split(",")[0])
    original_err = float(msg.split("; original relative_error=")[1].split(",")[0])
    assert rewrite_err > 1e-3 > original_err


def test_verify_raises_on_a_sparse_rewrite_that_is_wrong(monkeypatch):
    monkeypatch.setitem(ops._REFERENCES, "sparse_absorbed", _perturbed("sparse_absorbed"))
    model = tiny_model("deepseek_v32", seed=1)
    twin = compiled_twin(model, verify=True, form="sparse_absorbed")
    with pytest.raises(VerificationError, match="relative_error"):
        _run(model, twin)


def test_verify_raises_on_nan_the_original_does_not_produce(monkeypatch):
    monkeypatch.setitem(ops._REFERENCES, "absorbed", _perturbed("absorbed", how="nan"))
    model = tiny_model("deepseek_v3", seed=1)
    twin = compiled_twin(model, verify=True, form="absorbed")
    with pytest.raises(VerificationError, match="NaN"):
        _run(model, twin)


def test_verify_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLA_COMPILE_VERIFY", "1")
    monkeypatch.setitem(ops._REFERENCES, "absorbed", _perturbed("absorbed"))
    model = tiny_model("deepseek_v3", seed=1)
    twin = compiled_twin(model, form="absorbed")
    with pytest.raises(VerificationError):
        _run(model, twin)


def test_without_verify_a_broken_rewrite_goes_unnoticed(monkeypatch):
    """The control for the tests above: the perturbation really changes the answer, and only verify
    catches it."""
    monkeypatch.setitem(ops._REFERENCES, "absorbed", _perturbed("absorbed"))
    model = tiny_model("deepseek_v3", seed=1)
    twin = compiled_twin(model, form="absorbed")
    got, want = _run(model, twin, steps=1)
    assert max(rel_err(g, w) for g, w in zip(got, want)) > 1e-3


def test_verify_checks_only_the_first_calls(count_checks):
    model = tiny_model("deepseek_v3", seed=1)
    twin = compiled_twin(model, verify=True, verify_calls=1, form="absorbed")
    _run(model, twin, steps=4)
    graphs = {r.graph for r in mla_compile.rewrite_log()}
    # one check per compiled graph (prefill, decode), not one per call (5 calls)
    assert len(count_checks) == len(graphs) < 5


def test_compare_reports_both_errors_against_float64():
    """Unit level: a graph whose float64 recomputation exists, and a 'rewrite' that is off."""
    class G(torch.nn.Module):
        def forward(self, x):
            return (torch.softmax(x * 3.0, -1) @ x,)

    g = G()
    x = torch.randn(4, 8, 8)
    want = g(x)
    got = (want[0] * 1.01,)
    with pytest.raises(VerificationError) as info:
        verify.compare(list(got), list(want), 7, g, (x,))
    msg = str(info.value)
    assert "graph 7 output 0" in msg and "float64 recomputation" in msg
    verify.compare(list(want), list(want), 7, g, (x,))          # equal outputs pass


def test_compare_tolerates_finite_where_original_is_nan():
    want = torch.tensor([1.0, float("nan"), 3.0])
    got = torch.tensor([1.0, 0.0, 3.0])
    verify.compare([got], [want], 1)
    with pytest.raises(VerificationError, match="NaN"):
        verify.compare([want], [got], 1)


def test_errors_figures():
    w = torch.tensor([1.0, 2.0, 3.0])
    e = verify.errors(w, w)
    assert e["relative_error"] == 0 and abs(e["cosine_similarity"] - 1) < 1e-12 and e["wmape"] == 0
    e = verify.errors(-w, w)
    assert abs(e["cosine_similarity"] + 1) < 1e-12 and abs(e["wmape"] - 2) < 1e-12
