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


def _repetitive_prompt(vocab: int, seed: int) -> torch.Tensor:
    """A prompt whose n-grams repeat, so that prompt lookup has drafts to propose."""
    base = torch.randint(3, vocab, (1, 6), generator=torch.Generator().manual_seed(seed))
    return torch.cat([base, base, base[:, :3]], 1)


@pytest.mark.parametrize("recipe", ["one-liner", "compile_generate"])
def test_assisted_generation_gives_eager_tokens(recipe):
    """Prompt lookup verifies a block of draft tokens per forward (S > 1 over the cache): the compiled
    model accepts exactly the drafts eager accepts. HF's StaticCache takes no room for a draft block
    past max_new_tokens (HF's own static path fails the same way), so the recipe is given headroom."""
    model = tiny_model("deepseek_v3", seed=41, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    ids = _repetitive_prompt(model.config.vocab_size, seed=42)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4)
    want = model.generate(ids, **kw)
    torch._dynamo.reset()
    mla_compile.reset()
    if recipe == "one-liner":
        model.compile(backend="mla", options={"remainder": "eager"})
    else:
        mla_compile.compile_generate(model, options={"remainder": "eager"}, max_cache_len=ids.shape[1] + 12 + 4)
    got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    log = mla_compile.rewrite_log()
    assert log and {r.status for r in log} == {"rewritten"}, mla_compile.format_rewrite_log()
    if recipe == "one-liner":     # the draft blocks ran through our op (HF verifies them uncompiled under its static recipe)
        assert any(r.shapes["S"] != 1 for r in log if r.graph > 1), mla_compile.format_rewrite_log()
