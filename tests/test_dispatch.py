"""Dynamic shapes: one compiled decode graph switches form at the cost model's crossover, no recompiles."""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

import mla_compile
from mla_compile.passes import dispatch
from mla_compile.tiny import tiny_model
from tests.helpers.e2e import compiled_twin, rel_err


def test_decode_loop_switches_form_at_the_crossover_without_recompiling():
    # Sizes whose CPU crossover between expanded and absorbed (S=1) lies near T=90: short loop.
    model = tiny_model("deepseek_v3", heads=8, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                       v_head_dim=32, layers=1, seed=31)
    compiles = []
    twin = compiled_twin(model, device="cpu")
    real_backend = mla_compile.backend.rewrite_graph

    def counting(gm, opts, graph_id, *times):
        compiles.append(graph_id)
        return real_backend(gm, opts, graph_id, *times)

    mla_compile.backend.rewrite_graph = counting
    try:
        g = torch.Generator().manual_seed(32)
        ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=g)
        caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
        with torch.no_grad():
            outs = [m(input_ids=ids, past_key_values=c, use_cache=True) for m, c in zip((model, twin), caches)]
            steps = 0
            while caches[0].get_seq_length() < 140:
                tok = torch.randint(3, model.config.vocab_size, (2, 1), generator=g)
                outs = [m(input_ids=tok, past_key_values=c, use_cache=True) for m, c in zip((model, twin), caches)]
                assert rel_err(outs[1].logits, outs[0].logits) < 1e-4
                steps += 1
    finally:
        mla_compile.backend.rewrite_graph = real_backend
    assert len(compiles) <= 3, f"{len(compiles)} compiles: prefill, first decode, one dynamic decode graph at most"
    autos = [r for r in mla_compile.rewrite_log() if r.form == "auto"]
    assert autos, mla_compile.format_rewrite_log()
    crossover = autos[0].crossover
    boundary = float(crossover.split("expanded while T < ")[1].split(";")[0])
    assert 20 < boundary < 140, crossover
    chooser = max(dispatch._CHOOSERS.values(), key=lambda c: sum(c.counts.values()))
    # The dynamic graph serves T = 8 .. 140 (the first decode step, T = 7, has its own static graph);
    # the chooser ran once per step, and switched from expanded to absorbed at the predicted T.
    first_dynamic_T, last_T = 8, 140
    want_expanded = sum(1 for T in range(first_dynamic_T, last_T + 1) if T < boundary)
    assert chooser.counts.get("expanded", 0) == want_expanded, (chooser.counts, boundary)
    assert chooser.counts.get("absorbed", 0) == (last_T - first_dynamic_T + 1) - want_expanded, chooser.counts
    # the log says which forms the auto rows ran (all layers share the step count)
    assert all(sum(r.runs.values()) == last_T - first_dynamic_T + 1 for r in autos), [r.runs for r in autos]
    assert f"ran: absorbed x{chooser.counts['absorbed']}" in mla_compile.format_rewrite_log()
    assert math.isfinite(boundary)


# -- mla.auto's own Autograd kernel: the body at once where nothing is traced or differentiated --------

def _auto_call(args, pid):
    return torch.ops.mla.auto(args["q_nope"], args["q_rope"], args["latent"], args["k_rope"], args["w_uk"],
                              args["w_uv"], None, args["mask"], 0.25, False, pid)


def _count_generated(monkeypatch):
    """Calls that take torch's generated autograd kernel (the slow path), counted."""
    calls = []
    generated = dispatch._generated_autograd
    monkeypatch.setattr(dispatch, "_generated_autograd", lambda *a: (calls.append(1), generated(*a))[1])
    return calls


def test_auto_runs_its_body_directly_on_plain_tensors_without_gradients(monkeypatch):
    from tests.helpers.reference import naive_mla, random_inputs

    calls = _count_generated(monkeypatch)
    pid = dispatch.register(dispatch.Chooser(lambda sizes: "absorbed", "absorbed always"))
    args = random_inputs(2, 4, 1, 19, 32, 8, 16, 16, mask="bool", seed=5)
    want = naive_mla(**{k: (v.double() if v.is_floating_point() else v) for k, v in args.items()}, scale=0.25)
    with torch.no_grad():
        got = _auto_call(args, pid)
    assert not calls, "a no-grad call on plain tensors took the generated autograd kernel"
    # grad mode on, but no input requires grad: the fast path too
    got_grad_mode = _auto_call(args, pid)
    assert not calls and not got_grad_mode.requires_grad
    for out in (got, got_grad_mode):
        assert out.shape == want.shape and out.dtype == torch.float32
        assert (out.double() - want).abs().max() < 1e-5 * want.abs().max()


def test_auto_differentiates_and_traces_through_the_generated_kernel(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tests.helpers.reference import naive_mla, random_inputs

    calls = _count_generated(monkeypatch)
    pid = dispatch.register(dispatch.Chooser(lambda sizes: "absorbed", "absorbed always"))
    args = random_inputs(2, 4, 1, 13, 32, 8, 16, 16, dtype=torch.float64, mask="float", seed=6)
    leaves = {k: v.clone().requires_grad_(k in ("q_nope", "latent", "w_uv")) if v is not None else None
              for k, v in args.items()}
    _auto_call(leaves, pid).square().sum().backward()
    assert len(calls) == 1
    ref = {k: v.clone().requires_grad_(k in ("q_nope", "latent", "w_uv")) if v is not None else None
           for k, v in args.items()}
    naive_mla(**ref, scale=0.25).square().sum().backward()
    for k in ("q_nope", "latent", "w_uv"):
        assert torch.allclose(leaves[k].grad, ref[k].grad, rtol=1e-9, atol=1e-10), k
    # fake tensors (Dynamo's and AOTAutograd's tracing) never reach the body
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if v is not None else None for k, v in args.items()}
        out = _auto_call(fake, pid)
    assert out.shape == (2, 4, 1, 16) and type(out).__name__ == "FakeTensor"
    assert len(calls) == 2
