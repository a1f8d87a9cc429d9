"""DeepSeek-V4's CSA layers with the indexer's top-k entries gathered (`mla.latent_mqa_gathered`,
passes/forms/latent_mqa.py; the proof in passes/shared_kv.py) instead of HF's dense `block_bias`.

The op against float64 attention over HF's dense mask (the window's mask, then -inf with zeros scattered
at the picks, as HF builds it), reference and Triton kernel (interpreter on the CPU); bad inputs; the
cost model; the tiny model's CSA layer rewritten to the gathered form, prefill and generate() equal to
eager with the indexer picking 2 of the compressed entries; a near miss left dense with its reason.
"""

from __future__ import annotations

import pytest
import torch

import mla_compile
import mla_compile.passes.forms  # noqa: F401  (registers torch.ops.mla)
from mla_compile.passes.forms.latent_mqa import latent_mqa_gathered_kernel, latent_mqa_gathered_reference
from mla_compile.tiny import tiny_deepseek_v4
from tests.helpers.e2e import rel_err
from tests.test_deepseek_v4 import SCALE, hf_shared_kv_attention

MIN = torch.finfo(torch.float32).min


def hf_csa_mask(window_mask, picks, C):
    """HF's CSA mask, as DeepseekV4CSACompressor and the attention build it: -1 picks park in a spare
    column, zeros scattered at the picks over an -inf fill, the spare column sliced off, the window's
    mask before it."""
    B, S, _ = picks.shape
    safe = torch.where(picks >= 0, picks, torch.full_like(picks, C))
    bias = torch.full((B, 1, S, C + 1), float("-inf"))
    bias.scatter_(-1, safe.unsqueeze(1), 0.0)
    return torch.cat([window_mask.double(), bias[..., :C].double()], -1)


def make(B, H, S, W, C, k, D, seed, dtype=torch.float32, none_every=3):
    """Random q, kv (W window keys then C entries), sinks, a window mask (0 / finfo.min, some rows
    fully masked on the window), distinct picks with some -1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g).to(dtype)
    kv = torch.randn(B, 1, W + C, D, generator=g).to(dtype)
    sinks = torch.randn(H, generator=g)
    ok = torch.rand(B, 1, S, W, generator=g) > 0.3
    ok[0, 0, 0] = False                                          # a query that sees no window key
    mask = torch.zeros(B, 1, S, W).masked_fill(~ok, MIN)
    picks = torch.stack([torch.randperm(C, generator=g)[:k] for _ in range(B * S)]).view(B, S, k)
    picks.view(-1)[::none_every] = -1
    return q, kv, sinks, mask, picks


@pytest.mark.parametrize("impl", [latent_mqa_gathered_reference, latent_mqa_gathered_kernel],
                         ids=["reference", "triton"])
@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("B,H,S,W,C,k,D", [(2, 4, 1, 8, 13, 4, 32), (2, 3, 5, 7, 6, 3, 16)])
def test_gathered_op_matches_hf_dense_csa_mask_in_float64(impl, with_sinks, B, H, S, W, C, k, D):
    q, kv, sinks, mask, picks = make(B, H, S, W, C, k, D, seed=B * 100 + S + k)
    sinks = sinks if with_sinks else None
    got = impl(q, kv, mask, picks, SCALE, sinks)
    want = hf_shared_kv_attention(q, kv, hf_csa_mask(mask, picks, C), SCALE, sinks)
    assert got.shape == (B, H, S, D)
    assert rel_err(got, want) < 1e-5
    # the picks matter: without them (every entry -1) the answer changes
    none = impl(q, kv, mask, torch.full_like(picks, -1), SCALE, sinks)
    assert rel_err(none, want) > 1e-2


def test_gathered_op_takes_a_bool_window_mask_and_int32_picks():
    q, kv, sinks, mask, picks = make(2, 4, 3, 6, 9, 5, 16, seed=11)
    want = hf_shared_kv_attention(q, kv, hf_csa_mask(mask, picks, 9), SCALE, sinks)
    for impl in (latent_mqa_gathered_reference, latent_mqa_gathered_kernel):
        assert rel_err(impl(q, kv, mask > -1, picks.int(), SCALE, sinks), want) < 1e-5


def test_gathered_op_gradients_match_autograd_through_hf_math():
    q, kv, sinks, mask, picks = make(2, 3, 4, 5, 7, 3, 8, seed=21)
    q, kv, sinks = (t.double().requires_grad_() for t in (q, kv, sinks))
    out = torch.ops.mla.latent_mqa_gathered(q, kv, mask.double(), picks, SCALE, sinks)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, kv, sinks), g)
    ref = [t.detach().clone().requires_grad_() for t in (q, kv, sinks)]
    want_out = hf_shared_kv_attention(ref[0], ref[1], hf_csa_mask(mask, picks, 7), SCALE, ref[2])
    want = torch.autograd.grad(want_out, ref, g)
    assert rel_err(out.detach(), want_out.detach()) < 1e-12
    for name, a, b in zip(("q", "kv", "sinks"), got, want):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("bad,error,match", [
    (dict(picks=torch.full((2, 1, 3), 9)), ValueError, r"values must lie in \[-1, T=9\)"),
    (dict(picks=torch.full((2, 1, 3), -2)), ValueError, r"values must lie in \[-1, T=9\)"),
    (dict(picks=torch.zeros(2, 1, 3)), TypeError, "topk_indices: expected int32 or int64"),
    (dict(picks=torch.zeros(2, 2, 3, dtype=torch.long)), ValueError, r"topk_indices: expected \[B=2, S=1, k\]"),
    (dict(mask=None), ValueError, "the gathered form needs the window's mask"),
    (dict(mask=torch.zeros(2, 1, 1, 20)), ValueError, "more than kv's T=17"),
    (dict(q=torch.randn(2, 4, 1, 32).to(torch.int32)), TypeError, "q: expected a floating dtype"),
    (dict(kv=torch.randn(2, 1, 17, 32).double()), TypeError, "kv: dtype torch.float64 differs"),
    (dict(sinks=torch.randn(3)), ValueError, "sinks: expected one logit per head"),
])
def test_bad_gathered_inputs_are_named(bad, error, match):
    q, kv, sinks, mask, picks = make(2, 4, 1, 8, 9, 3, 32, seed=3)
    args = dict(q=q, kv=kv, mask=mask, picks=picks, sinks=sinks)
    args.update(bad)
    for fn in (latent_mqa_gathered_reference, latent_mqa_gathered_kernel):
        with pytest.raises(error, match=match):
            fn(args["q"], args["kv"], args["mask"], args["picks"], SCALE, args["sinks"])


@pytest.mark.parametrize("device", ["h100", "h200"])
def test_csa_cost_model_prices_gathered_next_to_dense(device):
    """At long decode (C entries >> k picks) the gathered form is predicted cheaper than dense over
    HF's mask; a prefill whose window covers the prompt reads the window either way."""
    from mla_compile.cost.plan import resolve_device
    from mla_compile.cost.shared_kv import gathered_costs

    dev = resolve_device(device)
    long = gathered_costs(dict(B=4, H=64, S=1, T=128 + 65536, D=512, W=128, k=512), dev, torch.bfloat16)
    assert 0 < long["latent_mqa_gathered"][1] < long["latent_mqa"][1] < long["as_written"][1]
    short = gathered_costs(dict(B=4, H=64, S=1, T=128 + 16, D=512, W=128, k=16), dev, torch.bfloat16)
    assert short["latent_mqa"][1] < long["latent_mqa"][1]
    symbolic = gathered_costs(dict(B=4, H=64, S=1, T="dynamic", D=512, W=128, k=512), dev, torch.bfloat16)
    assert symbolic["latent_mqa_gathered"][1] is None and "T" in str(symbolic["latent_mqa_gathered"][0])


def _csa(log):
    return [r for r in log if r.module == "model.layers.1.self_attn"]


def test_csa_layer_is_gathered_and_equal_to_eager_through_generate():
    """The indexer picks 2 of the compressed entries: prefill of a padded batch and the decode steps
    (static and dynamic sizes) of generate() run the CSA layer as mla.latent_mqa_gathered, eager's
    logits and tokens; the sliding and HCA layers stay dense latent MQA."""
    model = tiny_deepseek_v4(seed=4, index_topk=2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0
    opts = {"remainder": "eager", "form": "sparse"}
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(model, backend="mla", options=opts)(ids, attention_mask=mask).logits
        assert rel_err(got, want) < 1e-5
        rows = _csa(mla_compile.rewrite_log())
        assert [r.form for r in rows] == ["latent_mqa_gathered"], mla_compile.format_rewrite_log()
        assert rows[0].shapes["k"] == 2 and rows[0].shapes["W"] == 16
        assert {"latent_mqa_gathered", "latent_mqa", "as_written"} <= set(rows[0].costs)
        others = [r for r in mla_compile.rewrite_log() if r not in rows]
        assert {r.form for r in others} == {"latent_mqa"}

        torch._dynamo.reset()
        mla_compile.reset()
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        model.compile(backend="mla", options=opts)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    rows = _csa(mla_compile.rewrite_log())
    gathered = [r for r in rows if r.form == "latent_mqa_gathered"]
    assert len({r.graph for r in gathered}) >= 3, mla_compile.format_rewrite_log()   # prefill and decode steps
    assert any(r.shapes["S"] == 1 for r in gathered)
    assert any(r.shapes["T"] == "dynamic" for r in gathered), mla_compile.format_rewrite_log()
    assert all(r.status == "rewritten" for r in mla_compile.rewrite_log())


class _CsaAttention(torch.nn.Module):
    """HF's CSA mask and latent MQA core as HF writes them, with variants that break one step."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.sinks = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(40)))

    def forward(self, q, kv, window_mask, scores_c):
        B, H, S, D = q.shape
        C = scores_c.shape[-1]
        picks = scores_c.topk(3, dim=-1).indices
        if self.variant == "not_topk":
            picks = picks.flip(-1) % 2         # repeats: the dense bias counts an entry once, a gather twice
        picks = torch.where(picks >= C - 1, torch.full_like(picks, -1), picks)
        valid = picks >= 0
        safe = torch.where(valid, picks, torch.full_like(picks, C))
        fill = float("-inf") if self.variant != "fill_zero" else 0.0
        bias = kv.new_full((B, 1, S, C + 1), fill)
        bias.scatter_(-1, safe.unsqueeze(1), 0.0)
        mask = torch.cat([window_mask, bias[..., :C].to(window_mask.dtype)], dim=-1)
        k = kv[:, :, None].expand(B, 1, H, kv.shape[2], D).reshape(B, H, kv.shape[2], D)
        v = kv[:, :, None].expand(B, 1, H, kv.shape[2], D).reshape(B, H, kv.shape[2], D)
        scores = torch.matmul(q, k.transpose(2, 3)) * SCALE + mask
        logits = torch.cat([scores, self.sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)], -1)
        logits = logits - logits.max(-1, keepdim=True).values
        p = torch.softmax(logits, dim=-1)[..., :-1]
        return torch.matmul(p, v)


@pytest.mark.parametrize("variant,form,why", [
    ("as_hf", "latent_mqa_gathered", None),
    ("fill_zero", "latent_mqa", "not -inf"),
    ("not_topk", "latent_mqa", "not a topk's indices"),
])
def test_csa_proof_takes_only_hf_top_k_bias(variant, form, why):
    """Gathered only where the bias is proven HF's top-k mask; a near miss stays dense latent MQA under
    the mask as written, equal to eager, with the failed step in the log."""
    B, H, S, W, C, D = 2, 4, 3, 5, 6, 8
    g = torch.Generator().manual_seed(41)
    q = torch.randn(B, H, S, D, generator=g)
    kv = torch.randn(B, 1, W + C, D, generator=g)
    window_mask = torch.zeros(B, 1, S, W).masked_fill(torch.rand(B, 1, S, W, generator=g) < 0.3, MIN)
    scores_c = torch.randn(B, S, C, generator=g)
    module = _CsaAttention(variant)
    with torch.no_grad():
        want = module(q, kv, window_mask, scores_c)
        got = torch.compile(module, backend="mla", options={"remainder": "eager", "form": "sparse"})(
            q, kv, window_mask, scores_c)
    assert rel_err(got, want) < 1e-5
    log = mla_compile.rewrite_log()
    assert [(r.status, r.form) for r in log] == [("rewritten", form)], mla_compile.format_rewrite_log()
    if why:
        assert "CSA's top-k bias not gathered" in log[0].reason and why in log[0].reason, log[0].reason
