"""Attention sinks (HY-V4, DeepSeek-V4): one logit per head joins the softmax's normaliser as a key with
a zero value, `softmax(cat([scores, sink]))[..., :-1] @ V` as HF's eager attention computes it.

The references and the Triton kernels (interpreted on the CPU, compiled on a GPU) are compared with
that HF-style computation in float64, written out here from the expanded K and V, with HF's masks
(bool, finfo.min float, a row masked everywhere), causal prefill, a static cache's valid lengths, one
split and several, and the sparse (top-k gathered) kernel.
"""

from __future__ import annotations

import pytest
import torch

from mla_compile.passes.forms.absorbed import absorbed_reference
from mla_compile.passes.forms.expanded import expanded_reference
from tests.test_kernels import DEV, HAS_CUDA, f64, make, rel_err, tol

from mla_compile.kernels.absorbed_decode import absorbed_decode, absorbed_latent_attention  # noqa: E402
from mla_compile.kernels.expanded_prefill import expanded_prefill  # noqa: E402
from mla_compile.kernels.sparse_decode import sparse_absorbed_decode  # noqa: E402

SCALE = 0.3


def hf_sink_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask, scale, sinks, is_causal=False):
    """HF's eager attention with sinks, in float64, on the expanded K and V (hy_v4's
    eager_attention_forward: scores + mask, cat the sink column, softmax, drop it, times V)."""
    qn, qr, c, kr, wk, wv = (f64(x) for x in (q_nope, q_rope, latent, k_rope, w_uk, w_uv))
    B, H, S, _ = qn.shape
    c = c.reshape(B, -1, c.shape[-1])
    kr = kr.reshape(B, -1, kr.shape[-1])
    T = c.shape[1]
    k = torch.einsum("btr,hdr->bhtd", c, wk)
    v = torch.einsum("btr,hdr->bhtd", c, wv)
    scores = (qn @ k.transpose(-1, -2) + (qr @ kr.unsqueeze(1).transpose(-1, -2))) * scale
    if is_causal:
        scores = scores.masked_fill(~torch.ones(S, T, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        m = f64(mask)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    sink = f64(sinks).reshape(1, H, 1, 1).expand(B, H, S, 1)
    logits = torch.cat([scores, sink], -1)
    logits = logits - logits.max(-1, keepdim=True).values
    p = torch.softmax(logits, -1)[..., :-1]
    return p @ v


def _sinks(H, seed=7, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, generator=g) * 2).to(device)        # float32, as HF keeps the parameter


def _mask(kind, B, S, T, dtype):
    g = torch.Generator().manual_seed(3)
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, 1, S, T, generator=g) > 0.4
        m[0, 0, 0] = False                                      # one row sees no key: the sink takes it all
        return m.to(DEV)
    allowed = torch.rand(B, 1, S, T, generator=g) > 0.4
    m = torch.zeros(B, 1, S, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    m[0, 0, 0] = torch.finfo(dtype).min                         # every key at finfo.min
    return m.to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("reference", [absorbed_reference, expanded_reference])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_references_take_sinks_as_hf_does(reference, mask_kind):
    args = make(2, 3, 4, 9, dtype=torch.float64, device="cpu", seed=1)
    mask = _mask(mask_kind, 2, 4, 9, torch.float64)
    mask = mask.cpu() if mask is not None else None
    sinks = _sinks(3, device="cpu").double()
    got = reference(*args, mask, SCALE, False, sinks=sinks)
    want = hf_sink_attention(*args, mask, SCALE, sinks)
    assert rel_err(got, want) < 1e-12
    # and the sink changes the answer (the test would pass a kernel that ignored it otherwise)
    assert rel_err(reference(*args, mask, SCALE, False), want) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("splits", [1, 3])
def test_absorbed_kernel_with_sinks(dtype, mask_kind, splits):
    B, H, S, T = 2, 5, 1, 40
    qn, qr, c, kr, wk, wv = make(B, H, S, T, dtype=dtype, seed=2)
    mask = _mask(mask_kind, B, S, T, dtype)
    sinks = _sinks(H)
    want = hf_sink_attention(qn, qr, c, kr, wk, wv, mask, SCALE, sinks)
    q_lat = torch.einsum("bhsd,hdr->bhsr", qn, wk)
    o_lat = absorbed_latent_attention(q_lat, qr, c, kr, mask, SCALE, num_splits=splits, sinks=sinks)
    got = torch.einsum("bhsr,hdr->bhsd", o_lat.float(), wv.float())
    assert rel_err(got, want) < tol(dtype)
    got = absorbed_decode(qn, qr, c, kr, wk, wv, mask, SCALE, sinks=sinks)
    assert rel_err(got, want) < tol(dtype)


def test_absorbed_kernel_with_sinks_and_valid_lengths():
    """A static cache's fill: keys at or past kv_lens[b] are not read, and the sink still counts."""
    B, H, S, T = 3, 4, 1, 48
    qn, qr, c, kr, wk, wv = make(B, H, S, T, seed=4)
    kv_lens = torch.tensor([48, 17, 1], dtype=torch.int32, device=DEV)
    sinks = _sinks(H)
    keep = (torch.arange(T).view(1, 1, 1, T) < kv_lens.cpu().view(B, 1, 1, 1)).to(DEV)
    want = hf_sink_attention(qn, qr, c, kr, wk, wv, keep, SCALE, sinks)
    got = absorbed_decode(qn, qr, c, kr, wk, wv, None, SCALE, kv_lens=kv_lens, sinks=sinks)
    assert rel_err(got, want) < tol(torch.float32)


@pytest.mark.parametrize("mask_kind,is_causal", [(None, True), ("bool", False), ("float", False)])
def test_expanded_kernel_with_sinks(mask_kind, is_causal):
    B, H, S, T = 2, 3, 12, 12
    args = make(B, H, S, T, seed=5)
    mask = _mask(mask_kind, B, S, T, torch.float32)
    sinks = _sinks(H)
    want = hf_sink_attention(*args, mask, SCALE, sinks, is_causal=is_causal)
    got = expanded_prefill(*args, mask, SCALE, is_causal, sinks=sinks)
    assert rel_err(got, want) < tol(torch.float32)


@pytest.mark.parametrize("k", [5, 24])
def test_sparse_kernel_with_sinks(k):
    """Top-k gathered attention with sinks equals dense attention over the selected keys with sinks."""
    B, H, S, T = 2, 4, 1, 30
    qn, qr, c, kr, wk, wv = make(B, H, S, T, seed=6)
    g = torch.Generator().manual_seed(8)
    idx = torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(B * S)]).view(B, S, k).to(DEV)
    sinks = _sinks(H)
    selected = torch.zeros(B, 1, S, T, dtype=torch.bool)
    selected.view(B, S, T).scatter_(-1, idx.cpu().long(), True)
    want = hf_sink_attention(qn, qr, c, kr, wk, wv, selected.to(DEV), SCALE, sinks)
    got = sparse_absorbed_decode(qn, qr, c, kr, wk, wv, idx, None, SCALE, sinks=sinks)
    assert rel_err(got, want) < tol(torch.float32)


@pytest.mark.parametrize("bad,error,match", [
    (lambda H: torch.zeros(H + 1), ValueError, r"sinks: expected one logit per head, shape \[H=4\]"),
    (lambda H: torch.zeros(1, H), ValueError, r"shape \[H=4\], got \(1, 4\)"),
    (lambda H: torch.zeros(H, dtype=torch.int64), TypeError, "sinks: expected a floating dtype"),
    (lambda H: [0.0] * H, TypeError, "sinks: expected a tensor or None"),
])
def test_bad_sinks_are_named(bad, error, match):
    args = make(2, 4, 1, 8, seed=9)
    for fn in (absorbed_reference, expanded_reference, absorbed_decode, expanded_prefill):
        with pytest.raises(error, match=match):
            fn(*args, None, SCALE, False, sinks=bad(4) if callable(bad) else bad)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("H", [16, 128])
@pytest.mark.parametrize("splits", [None, 1])
def test_hopper_decode_with_sinks_bf16(H, splits):
    """V3 sizes in bf16: on Hopper the Gluon kernels run the core and the merge adds the sinks, with
    the split count that fills the GPU and with one split (which, with sinks, still goes through
    the merge: the kernel must write its partial output, not the final one)."""
    B, T = 8, 1000
    qn, qr, c, kr, wk, wv = make(B, H, 1, T, r=512, dr=64, dn=128, dv=128, dtype=torch.bfloat16, seed=10)
    mask = _mask("bool", B, 1, T, torch.bfloat16)
    sinks = _sinks(H)
    want = hf_sink_attention(qn, qr, c, kr, wk, wv, mask, SCALE, sinks)
    if splits is None:
        got = absorbed_decode(qn, qr, c, kr, wk, wv, mask, SCALE, sinks=sinks)
    else:
        q_lat = torch.einsum("bhsd,hdr->bhsr", qn.float(), wk.float()).to(qn.dtype)
        o_lat = absorbed_latent_attention(q_lat, qr, c, kr, mask, SCALE, num_splits=splits, sinks=sinks)
        got = torch.einsum("bhsr,hdr->bhsd", o_lat.float(), wv.float())
    assert rel_err(got, want) < tol(torch.bfloat16)


def _leaves(seed, H=3, S=4, T=7):
    args = [a.detach().cpu().double().requires_grad_() for a in make(2, H, S, T, seed=seed, device="cpu")]
    sinks = _sinks(H, device="cpu").double().requires_grad_()
    return args, sinks


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_op_gradients_with_sinks(form):
    """The ops' backward formulas, sinks' gradient included, against autograd through HF's math."""
    import mla_compile.passes.forms  # noqa: F401  (registers torch.ops.mla)

    mask = _mask("float", 2, 4, 7, torch.float64).cpu()
    args, sinks = _leaves(11)
    out = getattr(torch.ops.mla, form)(*args, mask, SCALE, False, None, sinks)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    got = torch.autograd.grad(out, args + [sinks], g)
    ref_args, ref_sinks = _leaves(11)
    want = torch.autograd.grad(hf_sink_attention(*ref_args, mask, SCALE, ref_sinks), ref_args + [ref_sinks], g)
    assert rel_err(out.detach(), hf_sink_attention(*ref_args, mask, SCALE, ref_sinks).detach()) < 1e-12
    for name, a, b in zip(["q_nope", "q_rope", "latent", "k_rope", "w_uk", "w_uv", "sinks"], got, want):
        assert rel_err(a, b) < 1e-10, name


def test_sparse_backward_with_sinks_matches_dense():
    """The sparse backward's sinks gradient equals the dense one over the selected keys."""
    from mla_compile.passes.forms.autograd import dense_backward, sparse_backward

    B, H, S, T, k = 2, 3, 2, 9, 4
    args = [a.cpu().double() for a in make(B, H, S, T, seed=13, device="cpu")]
    sinks = _sinks(H, device="cpu").double()
    g = torch.Generator().manual_seed(14)
    idx = torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(B * S)]).view(B, S, k)
    selected = torch.zeros(B, S, T, dtype=torch.bool).scatter_(-1, idx, True).unsqueeze(1)
    grad = torch.randn(B, H, S, args[5].shape[1], generator=g, dtype=torch.float64)
    dense = dense_backward(grad, *args, selected, SCALE, False, sinks)
    sparse = sparse_backward(grad, *args, idx, None, SCALE, False, sinks)
    assert len(dense) == len(sparse) == 7
    for a, b in zip(sparse, dense):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("form", ["sparse_absorbed", "sparse_expanded"])
def test_sparse_ops_with_sinks(form):
    """The sparse ops (references on the CPU in float64) with sinks, and their gradients, against
    HF's math over the selected keys."""
    import mla_compile.passes.forms  # noqa: F401

    B, H, S, T, k = 2, 3, 2, 9, 4
    g = torch.Generator().manual_seed(15)
    idx = torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(B * S)]).view(B, S, k)
    selected = torch.zeros(B, S, T, dtype=torch.bool).scatter_(-1, idx, True).unsqueeze(1)
    args, sinks = _leaves(16, H=H, S=S, T=T)
    out = getattr(torch.ops.mla, form)(*args, idx, None, SCALE, False, sinks)
    ref_args, ref_sinks = _leaves(16, H=H, S=S, T=T)
    want = hf_sink_attention(*ref_args, selected, SCALE, ref_sinks)
    assert rel_err(out.detach(), want.detach()) < 1e-12
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, args + [sinks], grad)
    ref = torch.autograd.grad(want, ref_args + [ref_sinks], grad)
    for name, a, b in zip(["q_nope", "q_rope", "latent", "k_rope", "w_uk", "w_uv", "sinks"], got, ref):
        assert rel_err(a, b) < 1e-10, name


# --------------------------------------------------------------------------------------------- #
# The matcher: HF's sink softmax is rewritten and equal; a variant it cannot prove is left as written
# (and still equal), with the failed step in the log.

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_B, _H, _S, _T, _R, _DN, _DV, _DR = 2, 4, 3, 6, 16, 8, 8, 4


class _SinkCore(nn.Module):
    """HF's expanded MLA core (kv_b_proj expansion, the shared RoPE key broadcast) with hy_v4's sink
    softmax, and a variant switch."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.kv_b = nn.Linear(_R, _H * (_DN + _DV), bias=False)
        self.sinks = nn.Parameter(torch.randn(_H) * 2)
        self.per_query = nn.Parameter(torch.randn(_S))

    def forward(self, q, c, kp, mask):
        B, T = c.shape[0], c.shape[1]
        kv = self.kv_b(c).view(B, T, _H, _DN + _DV).transpose(1, 2)
        k_nope, v = torch.split(kv, [_DN, _DV], dim=-1)
        k = torch.cat([k_nope, kp.expand(B, _H, T, _DR)], dim=-1)
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.3 + mask
        if self.variant == "per_query_sink":
            sink = self.per_query.reshape(1, 1, -1, 1).expand(B, _H, -1, 1)
        else:
            sink = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, q.shape[2], -1)
        if self.variant == "sink_first":          # the same math, spelled [sink, scores][..., 1:]
            logits = torch.cat([sink, scores], dim=-1)
        else:
            logits = torch.cat([scores, sink], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        p = probs[..., 1:] if self.variant == "sink_first" else probs[..., :-1]
        return torch.matmul(p.to(v.dtype), v)


def _sink_inputs(seed=21):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(_B, 1, _S, _T).masked_fill(torch.rand(_B, 1, _S, _T, generator=g) > 0.7,
                                                  torch.finfo(torch.float32).min)
    return (torch.randn(_B, _H, _S, _DN + _DR, generator=g), torch.randn(_B, _T, _R, generator=g),
            torch.randn(_B, 1, _T, _DR, generator=g), mask)


@pytest.mark.parametrize("variant,expect", [
    ("hf", "rewritten"),
    ("sink_first", "not [..., :-1]"),
    ("per_query_sink", "not one value per head"),
])
@pytest.mark.parametrize("form", ["expanded", "absorbed"])
def test_sink_softmax_is_proven_or_left_as_written(variant, expect, form):
    import mla_compile

    torch.manual_seed(22)
    m = _SinkCore(variant)
    args = _sink_inputs()
    with torch.no_grad():
        want = m(*args)
        got = torch.compile(m, backend="mla", options={"remainder": "eager", "form": form})(*args)
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    (rec,) = mla_compile.rewrite_log()
    if expect == "rewritten":
        assert rec.status == "rewritten" and rec.form == form and "attention sinks" in rec.reason, rec.reason
    else:
        assert rec.status == "skipped" and expect in rec.reason, rec.reason
