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
