"""The backend as a user meets it: entry point, options, the log, precision, near-misses, Inductor."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mla_compile
from mla_compile.tiny import tiny_model
from tests.helpers.e2e import compiled_twin, padded_batch, rel_err, run_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, cwd: str = "/tmp") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_backend_found_by_entry_point_in_a_fresh_process():
    """No import of mla_compile: torch.compile finds "mla" through the torch_dynamo_backends group."""
    out = _run_python("""
        import sys, torch
        from transformers import AutoConfig, AutoModelForCausalLM
        assert "mla" in torch._dynamo.list_backends(exclude_tags=()), torch._dynamo.list_backends(exclude_tags=())
        cfg = AutoConfig.for_model("deepseek_v3", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
            num_hidden_layers=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=16, intermediate_size=64, vocab_size=64, first_k_dense_replace=1)
        m = AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.randint(0, 64, (1, 5))
        want = m(ids).logits
        m.compile(backend="mla", options={"remainder": "eager"})
        got = m(ids).logits
        import mla_compile
        recs = mla_compile.rewrite_log()
        print(len(recs), recs[0].module, recs[0].status, float((got - want).abs().max()))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    n, module, status, err = out.stdout.split()
    assert int(n) == 1 and module == "model.layers.0.self_attn" and status == "rewritten" and float(err) < 1e-5


def test_unknown_option_is_a_clear_error():
    model = tiny_model("deepseek_v3", layers=1)
    model.compile(backend="mla", options={"remainder": "eager", "colour": "blue"})
    with pytest.raises(Exception, match="unknown options"):
        model(torch.randint(3, 100, (1, 4)))


@pytest.mark.parametrize("options,message", [
    ({"verify": "no"}, "options\\['verify'\\]: expected True or False"),
    ({"verify_calls": "x"}, "options\\['verify_calls'\\]"),
    ({"form": "bogus"}, "unknown form 'bogus'"),
])
def test_bad_option_values_are_clear_errors_even_without_mla(options, message):
    """Checked before anything is matched: a model with no MLA (a tiny Llama) gets the error too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    model.compile(backend="mla", options={"remainder": "eager", **options})
    with pytest.raises(Exception, match=message):
        model(torch.randint(3, 60, (1, 4)))


@pytest.mark.parametrize("where", ["match", "rewrite"])
def test_an_error_in_our_passes_leaves_the_region_as_written(where, monkeypatch):
    """No exception of the matcher or the rewrite escapes the backend: the region is left as HF wrote
    it (same output as eager), and the log says why."""
    import mla_compile.passes.match as match
    import mla_compile.passes.rewrite as rewrite

    def broken_match(core):
        raise ValueError("not enough values to unpack (expected 4, got 3)")

    def broken_rewrite(gm, region, form, **kw):
        with gm.graph.inserting_before(region.output):      # leaves a dangling node behind, then fails
            gm.graph.call_function(torch.neg, (region.latent,))
        raise RuntimeError("planted failure")

    if where == "match":
        monkeypatch.setattr(match, "_match_core", broken_match)
    else:
        monkeypatch.setattr(rewrite, "rewrite", broken_rewrite)
    model = tiny_model("deepseek_v3", layers=1)
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    twin = compiled_twin(model)
    with torch.no_grad():
        got = twin(ids).logits
    assert rel_err(got, want) < 1e-6
    log = mla_compile.rewrite_log()
    assert log and all(r.status == "skipped" and "left as written" in r.reason for r in log), \
        mla_compile.format_rewrite_log()
    assert ("not enough values" if where == "match" else "planted failure") in log[0].reason


def test_a_model_without_mla_says_so_per_attention_module():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).eval()
    model.compile(backend="mla", options={"remainder": "eager"})
    model(torch.randint(3, 60, (1, 4)))
    log = mla_compile.rewrite_log()
    assert [r.module for r in log] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(r.status == "skipped" and r.reason.startswith("no MLA here:") for r in log), \
        mla_compile.format_rewrite_log()


def test_compile_times_per_graph_in_the_log():
    """Each compiled graph's share of the compile time: its regions counted as the log lists them,
    the passes timed, no Inductor time with the eager remainder; the table ends with them; reset
    forgets them."""
    model = tiny_model("deepseek_v3", layers=2, seed=3)
    twin = compiled_twin(model)
    twin(torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(4)))
    recs = mla_compile.rewrite_log()
    times = {t.graph: t for t in mla_compile.compile_times()}
    assert recs and {r.graph for r in recs} <= set(times)
    for g in {r.graph for r in recs}:
        t = times[g]
        assert t.regions == sum(r.graph == g for r in recs) == 2
        assert t.match_s > 0 and t.decide_s > 0 and t.rewrite_s > 0 and t.inductor_s is None
        assert f"graph {g}: 2 region(s), our passes" in mla_compile.format_rewrite_log()
    mla_compile.reset()
    assert mla_compile.compile_times() == []


def test_reset_restarts_the_graph_numbering():
    ids = torch.randint(3, 100, (1, 4), generator=torch.Generator().manual_seed(1))
    first = compiled_twin(tiny_model("deepseek_v3", layers=1))
    first(ids)
    torch._dynamo.reset()
    second = compiled_twin(tiny_model("deepseek_v3", layers=1))
    second(ids)
    assert [r.graph for r in mla_compile.rewrite_log()] == [1, 2]
    mla_compile.reset()
    torch._dynamo.reset()
    third = compiled_twin(tiny_model("deepseek_v3", layers=1))
    third(ids)
    assert [r.graph for r in mla_compile.rewrite_log()] == [1]


def test_bad_form_is_a_clear_error():
    model = tiny_model("deepseek_v3", layers=1)
    model.compile(backend="mla", options={"remainder": "eager", "form": "squashed"})
    with pytest.raises(Exception, match="unknown form 'squashed'"):
        model(torch.randint(3, 100, (1, 4)))


def test_log_goes_to_jsonl_and_python_logging(tmp_path, caplog):
    path = tmp_path / "rewrites.jsonl"
    model = tiny_model("deepseek_v32")
    twin = compiled_twin(model, log=str(path))
    with caplog.at_level(logging.INFO, logger="mla_compile"):
        run_steps(twin, *padded_batch(model.config.vocab_size), torch.randint(3, 100, (2, 1)))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["module"] for r in lines} == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all({"module", "form", "family", "shapes", "reason", "status"} <= set(r) for r in lines)
    assert all(r["family"] == "deepseek_v32" and r["shapes"]["k"] is not None for r in lines)
    assert any("rewrote model.layers.0.self_attn" in m for m in caplog.messages)
    table = mla_compile.format_rewrite_log()
    assert "model.layers.1.self_attn" in table and "deepseek_v32" in table


def test_env_log_path(tmp_path, monkeypatch):
    path = tmp_path / "env.jsonl"
    monkeypatch.setenv("MLA_COMPILE_LOG", str(path))
    model = tiny_model("deepseek_v3", layers=1)
    twin = compiled_twin(model)
    twin(torch.randint(3, 100, (1, 4)))
    assert len(path.read_text().splitlines()) == 1


def test_returned_attention_probabilities_leave_the_region_alone():
    """output_attentions=True returns P to the caller: the forms never form P, so no rewrite, a reason,
    and HF's answer."""
    model = tiny_model("deepseek_v3")
    twin = compiled_twin(model)
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_attentions=True)
        got = twin(ids, attention_mask=mask, output_attentions=True)
    assert rel_err(got.logits, want.logits) < 1e-6
    assert all(rel_err(g, w) < 1e-6 for g, w in zip(got.attentions, want.attentions))
    log = mla_compile.rewrite_log()
    assert log and all(r.status == "skipped" for r in log)
    assert all("probabilities" in r.reason and "output_attentions" in r.reason for r in log), \
        mla_compile.format_rewrite_log()


def _logit_error(model, dtype, form, family):
    # No padding: HF's float64 mask (finfo.min) overflows to -inf on fully padded rows, and the NaN
    # that makes then spreads through V; float32/bf16 do not overflow there.
    ids, mask = padded_batch(model.config.vocab_size, seed=5, pad=0)
    dec = torch.randint(3, model.config.vocab_size, (2, 2), generator=torch.Generator().manual_seed(6))
    ref = run_steps(model.double(), ids, mask, dec)
    low = model.to(dtype)
    hf = run_steps(low, ids, mask, dec)
    ours = run_steps(compiled_twin(low, form=form), ids, mask, dec)
    return [rel_err(o, r) for o, r in zip(ours, ref)], [rel_err(h, r) for h, r in zip(hf, ref)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family,form", [("deepseek_v3", "absorbed"), ("deepseek_v3", "expanded"),
                                         ("deepseek_v32", "sparse_absorbed")])
def test_half_precision_model_within_what_the_dtype_allows(family, form, dtype):
    """Against a float64 run of the same weights, the rewrite's error is within a small multiple of
    HF's own error in that dtype (and of the dtype's resolution)."""
    # Dense MLPs: the MoE experts' grouped matmul has no float64 kernel for the reference run.
    dense = {"mlp_layer_types": ["dense", "dense"]} if family == "deepseek_v32" else {"first_k_dense_replace": 2}
    ours, hf = _logit_error(tiny_model(family, seed=7, **dense), dtype, form, family)
    eps = torch.finfo(dtype).eps
    for step, (o, h) in enumerate(zip(ours, hf)):
        assert o <= 2 * h + 4 * eps, f"step {step}: ours {o:.3g} vs HF {h:.3g} (eps {eps:.3g})"


def test_inductor_end_to_end_generate():
    """One real Inductor run in the default tier: the rest of the graph through compile_fx."""
    model = tiny_model("deepseek_v3", layers=1, seed=8)
    twin = compiled_twin(model, remainder="inductor")
    ids, mask = padded_batch(model.config.vocab_size, length=5, seed=9)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        got = twin.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)
    assert {r.status for r in mla_compile.rewrite_log()} == {"rewritten"}
    # the padded mask's length is dynamic from the first decode step on: no graph is deferred
    times = [t for t in mla_compile.compile_times() if t.regions]
    assert all(t.inductor_s is not None and t.inductor_s > 0 and not t.deferred for t in times), times


def test_first_decode_step_compiled_only_if_called_again():
    """Unpadded prompts: the first decode step has only static sizes and a cache that grows by `cat`;
    generate() runs it once, as the rewritten graph, without an Inductor compile of its own (the
    next step is traced again with a dynamic length). A graph like it that is called again is
    compiled at its second call. Every call gives eager's tokens and logits."""
    import copy

    model = tiny_model("deepseek_v3", layers=1, seed=10)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(11))
    twin = compiled_twin(model, remainder="inductor")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        want = model(step, cache=copy.deepcopy(out.past_key_values)).logits
        got = [twin(step, cache=copy.deepcopy(out.past_key_values)).logits for _ in range(3)]
    for g in got:
        assert rel_err(g, want) < 1e-5
    (times,) = [t for t in mla_compile.compile_times() if t.regions]
    assert times.deferred and times.inductor_s is not None and times.inductor_s > 0, times

    torch._dynamo.reset()
    mla_compile.reset()
    twin = compiled_twin(model, remainder="inductor")
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        got = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)
    times = [t for t in mla_compile.compile_times() if t.regions]
    assert [(t.inductor_s is not None, t.deferred) for t in times] == [(True, False), (False, True), (True, False)], \
        times
    assert "Inductor deferred to its second call" in mla_compile.format_rewrite_log()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v32", "kimi_linear", "mistral4"])
def test_inductor_end_to_end_more_families(family):
    model = tiny_model(family, seed=10)
    twin = compiled_twin(model, remainder="inductor")
    ids, mask = padded_batch(model.config.vocab_size, seed=11)
    dec = torch.randint(3, model.config.vocab_size, (2, 3))
    for g, w in zip(run_steps(twin, ids, mask, dec), run_steps(model, ids, mask, dec)):
        assert rel_err(g, w) < 1e-4


def test_generate_compile_config_names_the_backend():
    """The path CUDA graphs take with a StaticCache: generate compiles the decode steps itself
    (CompileConfig(backend="mla", ...)), prefill stays eager, so the cache tensors are created outside
    tracing and HF marks them static addresses. The decode graphs are rewritten; tokens equal eager's."""
    from transformers import CompileConfig

    model = tiny_model("deepseek_v3", seed=14)
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(15))
    cc = CompileConfig(backend="mla", mode=None, options={"remainder": "eager", "form": "absorbed"})
    cc._compile_all_devices = True          # HF compiles only on accelerators unless told (this is CPU)
    torch._dynamo.reset()
    mla_compile.reset()
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static",
                              disable_compile=True)
        assert not mla_compile.rewrite_log()
        got = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static",
                             compile_config=cc)
    assert torch.equal(got, want)
    rewritten = [r for r in mla_compile.rewrite_log() if r.status == "rewritten"]
    assert rewritten and {r.form for r in rewritten} == {"absorbed"}
    assert all(r.shapes["S"] == 1 for r in rewritten), "only decode steps are compiled"


def test_symbolic_static_cache_length_is_rewritten():
    """After a growing DynamicCache, Dynamo's automatic dynamic compiles the static-cache decode step
    with a symbolic length, and HF sizes K as new_empty(B, H, x.size()[2], dn+dr): a read of the
    expansion's shape only, which goes with K. The decode regions are rewritten, not left alone for
    it, and tokens equal eager's. (The static prefill at a symbolic prompt length, where HF's sdpa path
    slices K and V to [:, :, :S], is still a logged near-miss: see the log's reason.)"""
    import copy

    model = tiny_model("deepseek_v3", seed=16, attn_implementation="sdpa")
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(17))
    twin = copy.deepcopy(model)
    twin.forward = torch.compile(twin.forward, backend="mla", options={"remainder": "eager"})
    torch._dynamo.reset()
    with torch.no_grad():
        twin.generate(ids, max_new_tokens=4, do_sample=False)          # dynamic cache: T becomes symbolic
        mla_compile.reset()
        want = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static",
                              disable_compile=True)
        got = twin.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static",
                            disable_compile=True)
    assert torch.equal(got, want)
    log = mla_compile.rewrite_log()
    assert not any("also used by" in (r.reason or "") for r in log), mla_compile.format_rewrite_log()
    decode = [r for r in log if r.status == "rewritten" and r.shapes["S"] == 1]
    assert len(decode) == 2 and all(not isinstance(r.shapes["T"], int) or r.form == "auto" for r in decode), \
        mla_compile.format_rewrite_log()


def test_static_cache_reads_only_the_filled_part(monkeypatch):
    """generate(cache_implementation="static"): the dense op gets kv_lens = tokens written so far (the
    buffer is allocated at its maximum length), and the tokens equal eager's."""
    import mla_compile.passes.forms.ops as ops

    seen = []
    real = ops._dense

    def spy(form, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens, sinks=None):
        seen.append((q_nope.shape[2], None if kv_lens is None else int(kv_lens.max()), latent.shape[-2]))
        return real(form, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, is_causal, kv_lens, sinks)

    monkeypatch.setattr(ops, "_dense", spy)
    model = tiny_model("deepseek_v3", seed=12)
    twin = compiled_twin(model, form="absorbed")
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        seen.clear()
        got = twin.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)
    layers = 2
    # prefill of 5 tokens, then 3 decode steps (the 4th token needs no forward); per layer
    fills = [kv for _, kv, _ in seen[::layers]]
    assert fills == [5, 6, 7, 8], seen
    assert all(T >= kv for _, kv, T in seen) and seen[0][2] > seen[0][1], "the buffer is allocated at full length"
