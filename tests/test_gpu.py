"""HF families end to end on CUDA (kernels on), against eager in the same dtype and in float64.
Runs only where CUDA is present (marked gpu); CI without a GPU skips it."""

from __future__ import annotations

import pytest
import torch

import mla_compile
from mla_compile.tiny import DSA_FAMILIES, MLA_FAMILIES, tiny_model
from tests.helpers.e2e import compiled_twin, padded_batch, rel_err, run_steps

pytestmark = pytest.mark.gpu

GPU_FAMILIES = [f for f in ("deepseek_v3", "deepseek_v32", "kimi_linear", "mistral4") if f in MLA_FAMILIES]


def _forms(family):
    return ["auto", "absorbed", "expanded"] + (["sparse_absorbed"] if family in DSA_FAMILIES else [])


CASES = [(f, form, torch.bfloat16, "eager") for f in GPU_FAMILIES for form in _forms(f)] + [
    ("deepseek_v3", "absorbed", torch.float16, "eager"), ("deepseek_v32", "sparse_absorbed", torch.float16, "eager"),
    ("deepseek_v3", "auto", torch.bfloat16, "inductor"), ("deepseek_v32", "auto", torch.bfloat16, "inductor")]


@pytest.mark.parametrize("family,form,dtype,remainder", CASES)
def test_family_on_cuda_matches_eager(family, form, dtype, remainder):
    # Head and rank sizes that are multiples of 16, as in released models (tiny and odd sizes: the
    # kernel tests and the GPU fuzz).
    base = tiny_model(family, seed=21, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                      v_head_dim=32).cuda()
    ids, mask = padded_batch(base.config.vocab_size, batch=3, length=9, pad=0, seed=22)
    ids, mask = ids.cuda(), mask.cuda()
    dec = torch.randint(3, base.config.vocab_size, (3, 3), generator=torch.Generator().manual_seed(23)).cuda()
    ref = run_steps(base, ids, mask, dec)                       # float32 eager as the reference
    low = base.to(dtype)
    hf = run_steps(low, ids, mask, dec)
    ours = run_steps(compiled_twin(low, form=form, remainder=remainder), ids, mask, dec)
    assert {r.status for r in mla_compile.rewrite_log()} == {"rewritten"}, mla_compile.format_rewrite_log()
    eps = torch.finfo(dtype).eps
    for step, (o, h, r) in enumerate(zip(ours, hf, ref)):
        assert torch.isfinite(o).all()
        assert rel_err(o, r) <= 2 * rel_err(h, r) + 4 * eps, f"step {step}: ours {rel_err(o, r):.3g} HF {rel_err(h, r):.3g}"


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v32"])
def test_static_cache_under_cuda_graphs(family):
    """generate with a StaticCache and CompileConfig(backend="mla", mode="reduce-overhead"): the
    decode steps run as CUDA graphs of our kernels (the prefill stays eager), in float32, and the
    greedy tokens equal HF eager's. Inductor must not have skipped CUDA graphs for any graph."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = tiny_model(family, seed=24, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                       v_head_dim=32).cuda()
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(25)).cuda()
    torch._dynamo.reset()
    counters.clear()
    mla_compile.reset()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        want = model.generate(ids, disable_compile=True, **kw)
        cc = CompileConfig(backend="mla", mode="reduce-overhead")
        model.generate(ids, compile_config=cc, **kw)            # compiles; CUDA-graph warm-up and recording
        got = model.generate(ids, compile_config=cc, **kw)      # replays
    assert torch.equal(got, want)
    log = mla_compile.rewrite_log()
    assert log and {r.status for r in log} == {"rewritten"}, mla_compile.format_rewrite_log()
    assert not counters["inductor"].get("cudagraph_skips", 0), dict(counters["inductor"])
