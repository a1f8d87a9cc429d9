"""Helpers for end-to-end tests: run an HF model and its `backend="mla"` twin on the same steps."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

import mla_compile
from mla_compile.tiny import mla_attention_modules


def compiled_twin(model, **options):
    """A deep copy of model compiled in place with the mla backend (so .generate uses it too).
    The rest of the graph runs eagerly unless options say remainder="inductor" (slow on CPU)."""
    twin = copy.deepcopy(model)
    twin.compile(backend="mla", options={"remainder": "eager", **options})
    return twin


def _main_output(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def padded_batch(vocab: int, batch: int = 2, length: int = 7, pad: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and pad:
        mask[0, :pad] = 0                      # left padding on the first row
    return ids, mask


@torch.no_grad()
def run_steps(model, ids, mask, decode_tokens, cache="dynamic"):
    """Prefill, then one decode step per column of decode_tokens; returns the outputs of each step
    (logits, or the last hidden state for text-only models), at the positions that are not padding."""
    cfg = model.config
    kw = {"use_cache": cache != "none"}
    if cache == "dynamic":
        kw["past_key_values"] = DynamicCache(config=cfg)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    outs = [_main_output(out)[mask.bool()]]
    past = getattr(out, "past_key_values", None)
    for t in range(decode_tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if cache == "none":
            ids = torch.cat([ids, decode_tokens[:, t:t + 1]], dim=1)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            outs.append(_main_output(out)[:, -1])
        else:
            out = model(input_ids=decode_tokens[:, t:t + 1], attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            outs.append(_main_output(out)[:, -1])
    return outs


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def rewritten_modules(graph_filter=None):
    return {r.module for r in mla_compile.rewrite_log() if r.status == "rewritten"}


def expected_modules(model):
    return {name for name, _ in mla_attention_modules(model)}
