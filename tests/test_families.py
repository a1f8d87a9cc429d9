"""Every MLA family in the installed transformers, through torch.compile(backend="mla"), against HF eager.

The rest of each graph runs eagerly here (options remainder="eager") so the suite stays fast on CPU;
tests/test_backend.py (its Inductor tests, some in the slow tier) runs models through Inductor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mla_compile
from mla_compile.tiny import DSA_FAMILIES, MLA_FAMILIES, SINK_FAMILIES, has_causal_lm, tiny_model
from tests.helpers.e2e import compiled_twin, expected_modules, padded_batch, rel_err, run_steps
from tests.helpers.family_table import note

DECODE_STEPS = 3

# SINK_FAMILIES: per-head attention sinks in the softmax (HY-V4); eager attention only in transformers.
# Every family runs with the plain one line: no Dynamo setting is patched here (glm5_next's indexer
# needs capture_dynamic_output_shape_ops, which loading the backend turns on).


def _covered(expected: set, rewritten: set) -> set:
    """Expected modules with no rewrite. Where a model's own graph breaks (longcat_flash's MoE calls
    .item()), Dynamo resumes inside a layer and names modules relative to it: match by suffix."""
    return {e for e in expected if not any(e == r or e.endswith("." + r) for r in rewritten)}


def _decode_tokens(model, n=DECODE_STEPS, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, n), generator=g)


def _check_against_eager(model, twin, tol=1e-4, cache="dynamic", length=7):
    ids, mask = padded_batch(model.config.vocab_size, length=length)
    dec = _decode_tokens(model)
    want = run_steps(model, ids, mask, dec, cache=cache)
    got = run_steps(twin, ids, mask, dec, cache=cache)
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), f"step {step}: non-finite output"
        assert rel_err(g, w) < tol, f"step {step}: relative error {rel_err(g, w):.2e}"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_family_default_form_matches_eager(family, impl):
    if family in SINK_FAMILIES and impl == "sdpa":
        pytest.skip(f"{family} has no SDPA implementation in transformers")
    model = tiny_model(family, attn_implementation=impl)
    twin = compiled_twin(model)
    _check_against_eager(model, twin)
    log = mla_compile.rewrite_log()
    missing = _covered(expected_modules(model), {r.module for r in log if r.status == "rewritten"})
    assert not missing, f"not rewritten: {missing}; log:\n" + mla_compile.format_rewrite_log()
    note(family, impl, {r.form for r in log if r.status == "rewritten"})


# glm5_next builds its top-k mask by counting selections with scatter_add_ (duplicate indices
# allowed) and no base mask; the sparse forms assume HF's scatter form with unique indices, so the
# region is matched as dense attention under that mask, and a forced sparse form becomes dense.
DENSE_ONLY_DSA = {"glm5_next"}


def _forced_forms(family):
    forms = ["expanded", "absorbed"]
    return forms + (["sparse_absorbed", "sparse_expanded"] if family in DSA_FAMILIES else [])


def _expected_form(family, form):
    return form.removeprefix("sparse_") if family in DENSE_ONLY_DSA else form


@pytest.mark.parametrize("family,form", [(f, form) for f in MLA_FAMILIES for form in _forced_forms(f)])
def test_family_forced_form_matches_eager(family, form):
    model = tiny_model(family, seed=2)
    twin = compiled_twin(model, form=form)
    _check_against_eager(model, twin)
    forms = {r.form for r in mla_compile.rewrite_log() if r.status == "rewritten"}
    assert forms == {_expected_form(family, form)}, forms
    note(family, "forced", forms)


@pytest.mark.parametrize("family", [f for f in MLA_FAMILIES if has_causal_lm(f)])
def test_family_generate_gives_eager_tokens(family):
    model = tiny_model(family, seed=3)
    twin = compiled_twin(model)
    ids, mask = padded_batch(model.config.vocab_size, length=6, seed=4)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        got = twin.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert mla_compile.rewrite_log(), "generate() did not go through the backend"


def test_glm5_next_with_the_dynamo_setting_turned_off_says_what_to_set():
    """A user who turns capture_dynamic_output_shape_ops off keeps it off: Dynamo then breaks
    glm5_next's attention at its indexer's `nonzero`, the attention runs as HF wrote it, and the log
    names the break and the setting."""
    model = tiny_model("glm5_next", layers=1)
    ids = _decode_tokens(model, n=6, batch=1)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        want = model(ids).last_hidden_state
        got = torch.compile(model, backend="mla", options={"remainder": "eager"})(ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    notes = [r for r in mla_compile.rewrite_log() if "capture_dynamic_output_shape_ops = True" in r.reason]
    assert len(notes) == 1 and notes[0].status == "skipped" and notes[0].family == "glm5_next", \
        mla_compile.format_rewrite_log()
    assert "aten.nonzero" in notes[0].reason


_LOOKUP = """
import torch, torch._dynamo.config as c
{before}
torch.compile(lambda x: x + 1, backend="mla")
print(c.capture_dynamic_output_shape_ops)
"""


@pytest.mark.parametrize("before,want", [("", "True"), ("c.capture_dynamic_output_shape_ops = False", "False")])
def test_looking_up_the_backend_turns_on_data_dependent_shapes_unless_the_user_set_it(before, want):
    """`backend="mla"` loads the backend before Dynamo traces anything; loading it turns Dynamo's
    capture_dynamic_output_shape_ops on (glm5_next needs it), unless the user has set it. A fresh
    process: in this one the backend is loaded already."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _LOOKUP.format(before=before)], capture_output=True, text=True,
                         timeout=300, cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == want, out.stdout
