"""DeepSeek-V4's attention (`deepseek_v4`): one key/value head shared by all heads, K = V, with sinks,
rewritten into `mla.latent_mqa` (passes/shared_kv.py, passes/forms/latent_mqa.py).

The op against float64 attention written as HF writes it (the head repeated to every query head, the
sink column concatenated, the row max shifted out); the Triton core under the interpreter; the
gradients; then the model: every layer type (sliding window, CSA, HCA) rewritten and equal to eager
through prefill and generate() with padding.
"""

from __future__ import annotations

import pytest
import torch

import mla_compile
import mla_compile.passes.forms  # noqa: F401  (registers torch.ops.mla)
from mla_compile.passes.forms.latent_mqa import latent_mqa_kernel, latent_mqa_reference
from mla_compile.tiny import tiny_deepseek_v4
from tests.helpers.e2e import rel_err

SCALE = 0.17


def hf_shared_kv_attention(q, kv, mask, scale, sinks):
    """DeepSeek-V4's eager attention, in float64: repeat_kv, scores, mask, [scores, sink] - row max,
    softmax, drop the sink column, P V."""
    q, kv = q.double(), kv.double()
    B, H, S, D = q.shape
    k = kv[:, :, None].expand(B, 1, H, kv.shape[2], D).reshape(B, H, kv.shape[2], D)
    scores = q @ k.transpose(2, 3) * scale
    if mask is not None:
        scores = scores + (mask.double() if mask.dtype != torch.bool
                           else torch.zeros_like(mask, dtype=torch.float64).masked_fill(~mask, float("-inf")))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().reshape(1, -1, 1, 1).expand(B, -1, S, -1)], -1)
        scores = scores - scores.max(-1, keepdim=True).values
    p = torch.softmax(scores, -1)
    if sinks is not None:
        p = p[..., :-1]
    return p @ k


def make(B, H, S, T, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g).to(dtype)
    kv = torch.randn(B, 1, T, D, generator=g).to(dtype)
    sinks = torch.randn(H, generator=g)
    return q, kv, sinks


def window_mask(B, S, T, kind, window=5):
    """HF's sliding-window causal mask over the last S of T positions (float: 0 / finfo.min, or bool),
    the first key of batch row 1 padded away."""
    i = torch.arange(T - S, T)[:, None]
    j = torch.arange(T)[None, :]
    ok = ((j <= i) & (j > i - window)).expand(B, 1, S, T).clone()
    ok[1, :, :, 0] = False
    if kind == "bool":
        return ok
    return torch.zeros(B, 1, S, T).masked_fill(~ok, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("impl", [latent_mqa_reference, latent_mqa_kernel], ids=["reference", "triton"])
@pytest.mark.parametrize("mask_kind", ["float", "bool", None])
@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("B,H,S,T,D", [(2, 4, 1, 13, 32), (2, 3, 5, 9, 16)])
def test_latent_mqa_matches_hf_attention_in_float64(impl, mask_kind, with_sinks, B, H, S, T, D):
    q, kv, sinks = make(B, H, S, T, D, seed=B * 100 + S)
    sinks = sinks if with_sinks else None
    mask = window_mask(B, S, T, mask_kind) if mask_kind else None
    got = impl(q, kv, mask, SCALE, False, sinks)
    want = hf_shared_kv_attention(q, kv, mask, SCALE, sinks)
    assert got.shape == (B, H, S, D)
    assert rel_err(got, want) < 1e-5


def test_latent_mqa_op_gradients_match_autograd_through_hf_math():
    q, kv, sinks = (t.double().requires_grad_() for t in make(2, 3, 4, 7, 8, seed=21))
    mask = window_mask(2, 4, 7, "float").double()
    out = torch.ops.mla.latent_mqa(q, kv, mask, SCALE, False, sinks)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, kv, sinks), g)
    ref = [t.detach().clone().requires_grad_() for t in (q, kv, sinks)]
    want_out = hf_shared_kv_attention(ref[0], ref[1], mask, SCALE, ref[2])
    want = torch.autograd.grad(want_out, ref, g)
    assert rel_err(out.detach(), want_out.detach()) < 1e-12
    for name, a, b in zip(("q", "kv", "sinks"), got, want):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("bad,error,match", [
    (dict(q=torch.randn(2, 4, 32)), ValueError, "q: expected"),
    (dict(kv=torch.randn(2, 1, 9, 16)), ValueError, "kv: expected"),
    (dict(kv=torch.randn(2, 2, 9, 32)), ValueError, "kv: expected one shared head"),
    (dict(sinks=torch.randn(3)), ValueError, "sinks: expected one logit per head"),
    (dict(mask=torch.zeros(2, 4, 1, 9)), ValueError, "mask: shape"),
    (dict(mask=torch.zeros(4, 1, 9)), ValueError, "mask: shape"),
    (dict(mask=torch.zeros(2, 1, 9)), ValueError, r"mask: shape \(2, 1, 9\) has 2 at dim 0, the head axis"),
    (dict(mask=torch.zeros(1, 1, 1, 1, 9)), ValueError, r"mask: shape \(1, 1, 1, 1, 9\) has 5 dims"),
    (dict(q=torch.randn(2, 4, 1, 32).to(torch.int32)), TypeError, "q: expected a floating dtype"),
    (dict(kv=torch.randn(2, 1, 9, 32).double()), TypeError, "kv: dtype torch.float64 differs"),
])
def test_bad_latent_mqa_inputs_are_named(bad, error, match):
    q, kv, sinks = make(2, 4, 1, 9, 32, seed=3)
    args = dict(q=q, kv=kv, mask=None, sinks=sinks)
    args.update(bad)
    for fn in (latent_mqa_reference, latent_mqa_kernel):
        with pytest.raises(error, match=match):
            fn(args["q"], args["kv"], args["mask"], SCALE, False, args["sinks"])


def _rewritten(log):
    return [r for r in log if r.status == "rewritten"]


@pytest.mark.parametrize("index_topk", [16, 2])
def test_every_v4_layer_type_is_rewritten_and_equal_to_eager(index_topk):
    """Prefill of a padded batch: the sliding, CSA and HCA layers all become mla.latent_mqa, with the
    CSA indexer selecting every compressed entry (16) or two of the six (2: its block_bias masks the rest)."""
    model = tiny_deepseek_v4(seed=4, index_topk=index_topk)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(model, backend="mla", options={"remainder": "eager"})(ids, attention_mask=mask).logits
    assert rel_err(got, want) < 1e-5
    rows = _rewritten(mla_compile.rewrite_log())
    assert sorted(r.module for r in rows) == [f"model.layers.{i}.self_attn" for i in range(3)], \
        mla_compile.format_rewrite_log()
    assert all(r.form == "latent_mqa" and r.family == "deepseek_v4" and "sinks" in r.reason for r in rows)


def test_v4_generate_gives_eager_tokens():
    """Prefill and decode steps through generate() (DynamicCache; the window and compressed caches
    grow), with left padding: eager's tokens, and the decode graphs rewritten too."""
    model = tiny_deepseek_v4(seed=6)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        model.compile(backend="mla", options={"remainder": "eager"})
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    graphs = {r.graph for r in _rewritten(mla_compile.rewrite_log())}
    assert len(graphs) >= 2, mla_compile.format_rewrite_log()      # prefill and at least one decode graph
    assert not [r for r in mla_compile.rewrite_log() if r.status != "rewritten" and r.family == "deepseek_v4"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 4])
def test_latent_mqa_on_cuda_at_v4_sizes_bf16(S):
    """V4's published widths (64 heads, one 512-wide head) in bf16 on the GPU's Triton core, against
    float64, under a sliding-window mask with sinks."""
    B, H, T, D = 4, 64, 1000, 512
    q, kv, sinks = make(B, H, S, T, D, seed=30 + S, dtype=torch.bfloat16)
    mask = window_mask(B, S, T, "float", window=128).to(torch.bfloat16)
    q, kv, sinks, mask = q.cuda(), kv.cuda(), sinks.cuda(), mask.cuda()
    got = torch.ops.mla.latent_mqa(q, kv, mask, D ** -0.5, False, sinks)
    want = hf_shared_kv_attention(q.cpu(), kv.cpu(), mask.cpu(), D ** -0.5, sinks.cpu())
    assert rel_err(got.cpu(), want) < 2e-2


class _SharedHeadAttention(torch.nn.Module):
    """Plain attention over one shared head as HF writes it, with a variant that breaks one step."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.sinks = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(40)))

    @staticmethod
    def repeat(x, heads):
        B, G, T, D = x.shape
        return x[:, :, None, :, :].expand(B, G, heads, T, D).reshape(B, G * heads, T, D)

    def forward(self, q, kv, mask):
        H = q.shape[1] // kv.shape[1]
        if self.variant == "other_slice":     # K and V from two halves of one tensor: not one head
            D = q.shape[-1]
            k, v = self.repeat(kv[..., :D], H), self.repeat(kv[..., D:], H)
        else:
            k, v = self.repeat(kv, H), self.repeat(kv, H)
        scores = torch.matmul(q, k.transpose(2, 3)) * SCALE + mask
        if self.variant == "written_between":
            kv.mul_(2.0)          # V (a view of kv) changes after the scores were taken
        logits = torch.cat([scores, self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)], -1)
        p = torch.softmax(logits, dim=-1)[..., :-1]
        return torch.matmul(p, v)


@pytest.mark.parametrize("variant,rewritten,why", [
    ("as_hf", True, None),
    ("written_between", False, "written in place"),
    ("other_slice", False, None),
    ("two_heads", False, "2 heads"),
])
def test_shared_head_matcher_takes_only_exact_regions(variant, rewritten, why):
    """A region is rewritten only where K and V are one head repeated and nothing changes it between
    the scores and P @ V; a near miss runs as written, equal to eager, with a reason."""
    B, S, T, D = 2, 3, 6, 8
    g = torch.Generator().manual_seed(41)
    heads = 2 if variant == "two_heads" else 1
    q = torch.randn(B, 4, S, D, generator=g)
    kv = torch.randn(B, heads, T, 2 * D if variant == "other_slice" else D, generator=g)
    mask = window_mask(B, S, T, "float")
    module = _SharedHeadAttention(variant)
    with torch.no_grad():
        want = module(q, kv.clone(), mask)
        got = torch.compile(module, backend="mla", options={"remainder": "eager"})(q, kv.clone(), mask)
    assert rel_err(got, want) < 1e-5
    log = mla_compile.rewrite_log()
    assert [r.status for r in log] == (["rewritten"] if rewritten else ["skipped"]), mla_compile.format_rewrite_log()
    if why:
        assert why in log[0].reason, mla_compile.format_rewrite_log()


def test_latent_mqa_kernel_takes_strided_views():
    """V4's q reaches attention as a transposed view, kv as a slice of a wider buffer, the mask expanded."""
    B, H, S, T, D = 2, 4, 3, 10, 16
    g = torch.Generator().manual_seed(42)
    q = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    kv = torch.randn(B, 1, T + 5, 2 * D, generator=g)[:, :, 2:T + 2, :D]
    mask = window_mask(2, S, T, "float")[:1].expand(B, 1, S, T)
    sinks = torch.randn(H, generator=g)
    want = hf_shared_kv_attention(q, kv, mask, SCALE, sinks)
    for impl in (latent_mqa_reference, latent_mqa_kernel):
        assert rel_err(impl(q, kv, mask, SCALE, False, sinks), want) < 1e-5


@pytest.mark.parametrize("device", ["h100", "h200", "cpu"])
@pytest.mark.parametrize("B,S,T", [(8, 1, 32768), (1, 1, 128), (2, 64, 64)])
def test_shared_head_cost_model_prices_both_ways(device, B, S, T):
    """The same FLOPs both ways, H copies of the head HF's way: latent MQA predicted cheaper at every
    size; at long decode (memory-bound on a GPU) by at least the head count."""
    from mla_compile.cost.plan import resolve_device
    from mla_compile.cost.shared_kv import shared_kv_costs

    H = 64
    costs = shared_kv_costs(dict(B=B, H=H, S=S, T=T, D=512), resolve_device(device), torch.bfloat16,
                            mask=True, causal=True)
    latent, written = costs["latent_mqa"][1], costs["as_written"][1]
    assert 0 < latent < written
    if device != "cpu" and S == 1 and T >= 4096:
        assert written / latent > H
    symbolic = shared_kv_costs(dict(B=B, H=H, S=S, T="dynamic", D=512), resolve_device(device), torch.bfloat16,
                               mask=True, causal=True)
    assert symbolic["latent_mqa"][1] is None and "T" in str(symbolic["latent_mqa"][0])
