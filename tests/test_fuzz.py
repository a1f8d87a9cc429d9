"""Fuzzing: random valid MLA configurations through backend="mla" against HF eager.

Each example draws a family, a configuration (heads 1..8, kv_lora_rank, q_lora_rank None or an int
where the family accepts None, qk_rope_head_dim 0 where the family supports NoPE, nope/v head dims,
DSA top-k), a batch (1..3 rows, left padding on the first), a prompt length and a few decode steps,
and an `options["form"]` (auto or forced). The compiled twin must give eager's outputs at every
non-padding position (float32, 1e-4 relative).

A configuration eager itself rejects (the config class or HF's forward raises) is not the backend's
business: the example is rejected (hypothesis.reject), never counted as a pass.

    pytest tests/test_fuzz.py::test_fuzz_long -m slow --hypothesis-show-statistics     # longer run

The fast tier runs MLA_COMPILE_FUZZ_EXAMPLES (default 15) derandomized examples, so CI is
reproducible; test_fuzz_long (slow tier) runs MLA_COMPILE_FUZZ_LONG_EXAMPLES (default 500) examples
drawn from MLA_COMPILE_FUZZ_SEED (default 0): processes with different seeds share a long run.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, reject, seed, settings
from hypothesis import strategies as st

import mla_compile
from mla_compile.tiny import DSA_FAMILIES, MLA_FAMILIES, tiny_model
from tests.helpers.e2e import compiled_twin, rel_err, run_steps

FAST_EXAMPLES = int(os.environ.get("MLA_COMPILE_FUZZ_EXAMPLES", "15"))
LONG_EXAMPLES = int(os.environ.get("MLA_COMPILE_FUZZ_LONG_EXAMPLES", "500"))
# Several processes can share a long fuzz (e.g. on one GPU): each takes its own seed.
LONG_SEED = int(os.environ.get("MLA_COMPILE_FUZZ_SEED", "0"))
TOL = 1e-4
# The long fuzz runs once on the CPU and once on a GPU (MLA_COMPILE_FUZZ_DEVICE=cuda: kernels on).
DEVICE = os.environ.get("MLA_COMPILE_FUZZ_DEVICE", "cpu")

# From tiny.py's measurements (transformers 5.23): which families build and run with NoPE
# (qk_rope_head_dim = 0) and which accept q_lora_rank = None.
ROPE0_OK = {"dots3_note", "glm5_next", "kimi_linear", "mistral4", "mistral_large4"}
Q_LORA_NONE_OK = {"deepseek_v2", "deepseek_v3", "glm4_moe_lite", "minicpm3", "mistral4", "youtu",
                  "bailing_hybrid", "kimi_linear"}
FORMS = ("auto", "expanded", "absorbed", "sparse_absorbed", "sparse_expanded")


@st.composite
def mla_case(draw):
    family = draw(st.sampled_from(MLA_FAMILIES))
    cfg = dict(
        heads=draw(st.integers(1, 8)),
        kv_lora_rank=draw(st.sampled_from([8, 16, 24, 32])),
        qk_nope_head_dim=draw(st.sampled_from([4, 8, 16])),
        v_head_dim=draw(st.sampled_from([4, 8, 16])),
        layers=2,
    )
    rope_choices = [2, 4, 8] + ([0] if family in ROPE0_OK else [])
    cfg["qk_rope_head_dim"] = draw(st.sampled_from(rope_choices))
    q_lora = [8, 16] + ([None] if family in Q_LORA_NONE_OK else [])
    cfg["q_lora_rank"] = draw(st.sampled_from(q_lora))
    if family in DSA_FAMILIES:
        cfg["index_topk"] = draw(st.integers(1, 8))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 8))
    pad = draw(st.integers(0, length - 1)) if batch > 1 else 0
    steps = draw(st.integers(0, 2))
    form = draw(st.sampled_from(FORMS))
    seed = draw(st.integers(0, 2**16))
    return dict(family=family, cfg=cfg, batch=batch, length=length, pad=pad, steps=steps, form=form, seed=seed)


def check_case(case):
    family = case["family"]
    torch._dynamo.reset()
    mla_compile.reset()
    g = torch.Generator().manual_seed(case["seed"])
    try:
        model = tiny_model(family, seed=case["seed"] % 1000, **case["cfg"]).to(DEVICE)
    except Exception:
        reject()        # the family's config rejects these sizes
    vocab = model.config.vocab_size
    B, L, pad = case["batch"], case["length"], case["pad"]
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :pad] = 0
    dec = torch.randint(3, vocab, (B, case["steps"]), generator=g)
    ids, mask, dec = ids.to(DEVICE), mask.to(DEVICE), dec.to(DEVICE)
    try:
        want = run_steps(model, ids, mask, dec)
    except Exception:
        reject()        # HF's own forward fails on this configuration
    twin = compiled_twin(model, form=case["form"])
    got = run_steps(twin, ids, mask, dec)
    for step, (o, w) in enumerate(zip(got, want)):
        finite_w = torch.isfinite(w)
        assert torch.equal(torch.isfinite(o), finite_w), f"{case}: step {step}: non-finite values differ"
        err = rel_err(o[finite_w], w[finite_w])
        assert err < TOL, f"{case}: step {step}: relative error {err:.2e}\n" + mla_compile.format_rewrite_log()


_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                      HealthCheck.data_too_large])


@settings(max_examples=FAST_EXAMPLES, **_COMMON)
@given(mla_case())
def test_fuzz_compiled_matches_eager(case):
    check_case(case)


@pytest.mark.slow
@seed(LONG_SEED)
@settings(max_examples=LONG_EXAMPLES, **{**_COMMON, "derandomize": False})
@given(mla_case())
def test_fuzz_long(case):
    check_case(case)
