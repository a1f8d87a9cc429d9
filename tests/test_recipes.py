"""mla_compile.compile_generate: plain model.generate() decodes through a StaticCache with the decode
step compiled by backend="mla", and gives eager's tokens."""

from __future__ import annotations

import pytest
import torch

import mla_compile
from mla_compile.tiny import tiny_model


def test_plain_generate_takes_the_static_recipe():
    model = tiny_model("deepseek_v3", seed=31, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(32))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    want = model.generate(ids, **kw)                          # eager, DynamicCache
    torch._dynamo.reset()
    mla_compile.reset()
    assert mla_compile.compile_generate(model, options={"remainder": "eager"}) is model
    got = model.generate(ids, **kw)                           # nothing of ours in the call
    assert torch.equal(got, want)
    assert model._last_compile_config.backend == "mla"       # HF compiled the decode step with our backend
    log = mla_compile.rewrite_log()
    assert log and {r.status for r in log} == {"rewritten"}, mla_compile.format_rewrite_log()
    # the decode graph sees the preallocated cache: a static key length of prompt + new tokens - 1 or more
    assert all(isinstance(r.shapes["T"], int) and r.shapes["T"] >= 7 + 5 - 1 for r in log), \
        mla_compile.format_rewrite_log()


def test_bad_options_fail_when_the_recipe_is_set():
    model = tiny_model("deepseek_v3", seed=33)
    with pytest.raises(ValueError, match="unknown form 'bogus'"):
        mla_compile.compile_generate(model, options={"form": "bogus"})
    assert model.generation_config.cache_implementation is None      # nothing set on failure


def test_a_256_token_generate_compiles_the_decode_step_once():
    """The static recipe's decode step has the same shapes at every step: one graph, no recompiles."""
    from torch._dynamo.utils import counters

    model = tiny_model("deepseek_v3", seed=34, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(35))
    torch._dynamo.reset()
    counters.clear()
    mla_compile.reset()
    mla_compile.compile_generate(model, options={"remainder": "eager"})
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=256, min_new_tokens=256,
                         do_sample=False)
    assert out.shape == (2, 5 + 256)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len({r.graph for r in mla_compile.rewrite_log()}) == 1, mla_compile.format_rewrite_log()
