"""transformers' own serving path, `model.generate_batch(...)` (continuous batching over its paged MLA
cache), through `backend="mla"`: the same tokens as without the backend.

Continuous batching packs every request into one batch row, gathers each request's cached latent
rows and attends under a block-diagonal causal mask; its cache update is not traced (Dynamo resumes
inside the attention module after it), so one attention graph serves every layer. With SDPA the
region is rewritten (the form chosen on those packed sizes); HF's eager attention returns its
probabilities, which then leave that graph as an output, so it is left as written and the log says
why. (Reading the paged cache in place, per request, is not done: the gather happens before the
graph.)
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

import mla_compile
from mla_compile.tiny import tiny_model

PROMPT_LENGTHS = (7, 13, 20)


def _serve(model, prompts):
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate_batch(inputs=prompts, generation_config=config)
    return {rid: list(r.generated_tokens) for rid, r in out.items()}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_batch_gives_the_same_tokens(impl):
    model = tiny_model("deepseek_v3", layers=1, attn_implementation=impl, seed=5)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    with torch.no_grad():
        want = _serve(model, prompts)
        model.compile(backend="mla", options={"remainder": "eager"})
        got = _serve(model, prompts)
    assert got == want
    log = mla_compile.rewrite_log()
    assert log and all(r.family == "deepseek_v3" for r in log), mla_compile.format_rewrite_log()
    if impl == "sdpa":
        # the packed prefill (static sizes) and the decode steps (dynamic sizes: one graph for all)
        assert {r.status for r in log} == {"rewritten"}, mla_compile.format_rewrite_log()
        assert any(r.form == "auto" for r in log), mla_compile.format_rewrite_log()
    else:
        assert {r.status for r in log} == {"skipped"}, mla_compile.format_rewrite_log()
        assert all("probabilities" in r.reason and "sdpa" in r.reason and not r.reason.startswith("no MLA")
                   for r in log), mla_compile.format_rewrite_log()
