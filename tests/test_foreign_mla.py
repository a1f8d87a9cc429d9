"""MLA written by others, run through backend="mla" against itself run eagerly.

The code under test is vendored unchanged in tests/foreign/ (README.md there says from where):
DeepSeek-V3's `inference/model.py` (class MLA, attn_impl "absorb" and "naive"), DeepSeek-V3.2-Exp's
(MLA with its indexer) and FlashInfer's test reference `DeepseekV2AttentionVanilla`. tests/foreign/
shim.py replaces only what needs a GPU or a cluster, exactly:
  - DeepSeek's `kernel` module (fp8 act_quant / weight_dequant / fp8_gemm / fp8_index, Triton and
    tilelang): plain torch; with float32 weights the models never call the quantised paths;
  - `world_size` / `rank`: 1 / 0; V3.2's `dist.broadcast`: the identity (one process);
  - V3.2's `rotate_activation` (fast_hadamard_transform, bf16 only) and `einops.rearrange`: the same
    transform as a matrix product, and the one rearrange pattern as a view;
  - FlashInfer's imports of `flashinfer`, `tvm_ffi` and its test helpers (unused by the reference
    class), and its RoPE helper's "cuda:0" default device (the CPU instead).

Each test builds a tiny float32 module from fixed seeds, runs a causal prefill and decode steps on
fresh random inputs, eagerly and compiled (remainder="eager": no Inductor, so the test is fast), and
checks the outputs agree and the rewrite log has a record for every attention: rewritten where the
matcher proves the region equal to one of our forms, otherwise a skip that says why.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import mla_compile
from mla_compile.passes.contraction import _root
from mla_compile.passes.match import find_regions
from tests.foreign import shim
from tests.helpers.e2e import rel_err

TOL = 1e-5


def _init_(module: nn.Module, seed: int) -> None:
    """Fresh weights: N(0, 1/fan_in) for matrices, norms near one (DeepSeek's Linear is torch.empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _records():
    return [r for r in mla_compile.rewrite_log()]


def _one_record_equal_to_eager(m, args, what, **options):
    """m(*args) eagerly and compiled with backend="mla" (the rest eager) must agree; the graph holds
    one attention region, so the log holds one record, returned."""
    with torch.no_grad():
        want = copy.deepcopy(m)(*args)
        got = torch.compile(m, backend="mla", options={"remainder": "eager", **options})(*args)
    assert rel_err(got, want) < TOL, (what, rel_err(got, want))
    log = _records()
    assert len(log) == 1, [r.reason for r in log]
    return log[0]


def _as_expected(rec, expect: str) -> None:
    """expect: "rewritten", or a phrase the reason of a skip must contain."""
    if expect == "rewritten":
        assert rec.status == "rewritten", rec.reason
    else:
        assert rec.status == "skipped" and expect in rec.reason, rec.reason


# --------------------------------------------------------------------------------------------- #
# DeepSeek-V3 inference/model.py

def _deepseek_v3(attn_impl: str, seed: int = 0):
    mod = shim.deepseek("v3", attn_impl)
    args = mod.ModelArgs(max_batch_size=3, max_seq_len=24, dim=48, n_heads=4, q_lora_rank=0, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    attn = mod.MLA(args)
    _init_(attn, seed)
    return mod, args, attn


def _run_deepseek(mod, args, attn, batch: int, prompt: int, steps: int, seed: int, **options):
    """Prefill `prompt` tokens with DeepSeek's causal mask, then `steps` single-token decodes, eagerly
    (on one copy of the module and its caches) and compiled (on another). Returns both outputs."""
    twin = copy.deepcopy(attn)
    compiled = torch.compile(twin, backend="mla", options={"remainder": "eager", **options})
    freqs = mod.precompute_freqs_cis(args)
    g = torch.Generator().manual_seed(seed)
    want, got, pos = [], [], 0
    with torch.no_grad():
        for s in [prompt] + [1] * steps:
            x = torch.randn(batch, s, args.dim, generator=g)
            mask = torch.full((s, s), float("-inf")).triu_(1) if s > 1 else None   # as Transformer.forward
            want.append(attn(x, pos, freqs[pos:pos + s], mask))
            got.append(compiled(x, pos, freqs[pos:pos + s], mask))
            pos += s
    return want, got


@pytest.mark.parametrize("form", ["auto", "absorbed", "expanded"])
def test_deepseek_v3_absorb_is_rewritten_and_equal(form):
    mod, args, attn = _deepseek_v3("absorb")
    want, got = _run_deepseek(mod, args, attn, batch=2, prompt=5, steps=3, seed=1, form=form)
    for step, (w, o) in enumerate(zip(want, got)):
        assert rel_err(o, w) < TOL, f"step {step}: rel err {rel_err(o, w):.2e}"
    log = _records()
    assert log, "the attention graphs left no record"
    assert all(r.status == "rewritten" for r in log), [r.reason for r in log]
    assert all(r.core == "einsum" and r.shapes["H"] == 4 and r.shapes["r"] == 16 and r.shapes["dr"] == 4
               and r.shapes["dn"] == 8 and r.shapes["dv"] == 6 for r in log)
    if form != "auto":
        assert {r.form for r in log} == {form}


@pytest.mark.parametrize("version,form", [("v3", "absorbed"), ("v3", "auto"), ("v3.2-exp", "sparse_absorbed")])
def test_deepseek_cache_buffers_are_read_in_place(monkeypatch, version, form):
    """DeepSeek writes kv_cache / pe_cache by slice assignment and reads them as [:bsz, :end_pos]: the
    rewritten graph hands our op those views of its buffers, with no copy in between. In the graph:
    the op's latent and RoPE-key arguments are slices (getitem) of the buffer inputs, and nothing
    clones, copies or makes contiguous a buffer. At run time: the op receives tensors that start at
    the buffer's own storage with its strides, and the results equal eager."""
    from mla_compile.backend import mla_backend
    from mla_compile.passes.forms import ops

    if version == "v3":
        mod, args, attn = _deepseek_v3("absorb")
    else:
        mod, args, attn = _deepseek_v32_exp(optimize=1)
    twin = copy.deepcopy(attn)
    seen, graphs = [], []
    for name, ref in list(ops._REFERENCES.items()):
        def spy(q_nope, q_rope, latent, k_rope, *rest, _ref=ref, _name=name, **kw):
            seen.append((_name, latent, k_rope))
            return _ref(q_nope, q_rope, latent, k_rope, *rest, **kw)
        monkeypatch.setitem(ops._REFERENCES, name, spy)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return mla_backend(gm, example_inputs, options={"remainder": "eager", "form": form})

    compiled = torch.compile(twin, backend=backend)
    freqs = mod.precompute_freqs_cis(args)
    g = torch.Generator().manual_seed(20)
    pos = 0
    with torch.no_grad():
        for s in (5, 1, 1):
            x = torch.randn(2, s, args.dim, generator=g)
            mask = torch.full((s, s), float("-inf")).triu_(1) if s > 1 else None
            want, got = attn(x, pos, freqs[pos:pos + s], mask), compiled(x, pos, freqs[pos:pos + s], mask)
            assert rel_err(got, want) < TOL
            pos += s
    assert all(r.status == "rewritten" for r in _records()), [r.reason for r in _records()]

    decode = [(n, c, kp) for n, c, kp in seen if c.shape[1] > 5]        # the absorbed reads of the caches
    assert len(decode) == 2, [(n, tuple(c.shape)) for n, c, _ in seen]
    for name, c, kp in decode:
        for view, buf in ((c, twin.kv_cache), (kp, twin.pe_cache)):
            assert view.data_ptr() == buf.data_ptr() and view.stride() == buf.stride(), (name, view.stride())
            assert tuple(view.shape) == (2, view.shape[1], buf.shape[2])
    caches = {n for gm in graphs for n in gm.graph.nodes
              if n.op == "placeholder" and ("kv_cache" in n.name or "pe_cache" in n.name)}
    assert caches
    from_cache = []
    for gm in graphs:
        mla_calls = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("mla.")]
        for n in gm.graph.nodes:          # no copy of a buffer or of a view of one, cast included
            copies = (n.op == "call_method" and n.target in ("clone", "contiguous", "copy_", "float", "to")) \
                or (n.op == "call_function" and n.target in (torch.clone, torch.Tensor.contiguous))
            assert not (copies and _root(n.args[0]) in caches), n.format_node()
        reads = [a for call in mla_calls for a in call.args[2:4]
                 if a.op == "call_function" and a.target is operator.getitem and a.args[0] in caches]
        assert all(isinstance(e, slice) for a in reads for e in a.args[1]), [a.format_node() for a in reads]
        from_cache += reads
    assert len(from_cache) >= 2, "the decode graphs' ops do not read the cache buffers' slices directly"


def test_deepseek_v3_naive_prefill_is_rewritten_and_decode_a_logged_skip():
    """attn_impl="naive" caches expanded K/V (k_cache / v_cache). The prefill from position 0 writes
    k_cache[:b, 0:s] = K and reads k_cache[:b, :s] back (V likewise), so it attends over exactly the
    K and V it expanded from the latent: rewritten. A decode step reads positions earlier calls wrote,
    which nothing in its graph proves are images of a latent: a skip that says so. The caches are
    still written, so the decode steps after the rewritten prefill read what eager would."""
    mod, args, attn = _deepseek_v3("naive")
    want, got = _run_deepseek(mod, args, attn, batch=2, prompt=4, steps=2, seed=2)
    for w, o in zip(want, got):
        assert rel_err(o, w) < TOL
    log = _records()
    assert len(log) == 2, [r.reason for r in log]              # the prefill graph, then one dynamic decode graph
    prefill, decode = log
    assert prefill.status == "rewritten" and prefill.shapes["S"] == prefill.shapes["T"] == 4, prefill.reason
    assert decode.status == "skipped"
    assert "per-head V, an input of this graph, L_self_buffers_v_cache_" in decode.reason
    assert "writes L_self_buffers_v_cache_[:2, l_start_pos_:add] and reads L_self_buffers_v_cache_[:2, :add]" \
        in decode.reason, decode.reason


# --------------------------------------------------------------------------------------------- #
# FlashInfer's DeepseekV2AttentionVanilla (its sizes are fixed: H=128, r=512, dn=dv=128, dr=64)

@pytest.fixture(scope="module")
def flashinfer_vanilla():
    fi = shim.flashinfer_reference()
    torch.manual_seed(0)
    m = fi.DeepseekV2AttentionVanilla()
    shim.scale_weights_(m, seed=3)
    return m


@pytest.mark.parametrize("form", ["auto", "absorbed"])
def test_flashinfer_vanilla_is_rewritten_and_equal(flashinfer_vanilla, form):
    m = flashinfer_vanilla
    g = torch.Generator().manual_seed(4)
    B, T = 2, 7
    with torch.no_grad():
        f = torch.compile(m.run_decode, backend="mla", options={"remainder": "eager", "form": form})
        for step in range(2):           # two cache lengths: the second compiles a dynamic T
            h = torch.randn(B, 1, m.hidden_size, generator=g)
            c = torch.randn(B, T + step, m.kv_lora_rank, generator=g)
            kp = torch.randn(B, T + step, m.qk_rope_head_dim, generator=g)
            want, got = m.run_decode(h, c, kp), f(h, c, kp)
            assert rel_err(got, want) < TOL, f"step {step}: rel err {rel_err(got, want):.2e}"
    log = _records()
    assert log and all(r.status == "rewritten" and r.core == "eager" for r in log), [r.reason for r in log]
    assert all(r.shapes["H"] == 128 and r.shapes["r"] == 512 for r in log)


# --------------------------------------------------------------------------------------------- #
# The matcher never stops on a shape it did not foresee.

B_, T_, H_, R_, DN, DV, DR = 2, 5, 3, 8, 4, 4, 2


class _FlatLatent(nn.Module):
    """HF's expanded core over a 3-D latent [B, T, r] with the RoPE key broadcast by expand (a variant of
    FlashInfer's reference; the matcher once unpacked the latent's shape as 4-D and stopped on it)."""

    def __init__(self):
        super().__init__()
        self.kv_b = nn.Linear(R_, H_ * (DN + DV), bias=False)

    def forward(self, q, c, kp):
        B, T = c.shape[0], c.shape[1]
        kv = self.kv_b(c).view(B, T, H_, DN + DV).transpose(1, 2)
        k_nope, v = torch.split(kv, [DN, DV], dim=-1)
        k = k_nope.new_empty(*k_nope.shape[:3], DN + DR)
        k[..., :DN].copy_(k_nope)
        k[..., DN:].copy_(kp.expand(-1, k_nope.shape[1], -1, -1))
        p = F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.3, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


def _flat_inputs(B=B_, T=T_, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H_, 1, DN + DR, generator=g), torch.randn(B, T, R_, generator=g),
            torch.randn(B, 1, T, DR, generator=g))


@pytest.mark.parametrize("form", ["expanded", "absorbed"])
def test_flat_latent_with_expanded_rope_key_is_rewritten(form):
    torch.manual_seed(6)
    m = _FlatLatent()
    args = _flat_inputs()
    with torch.no_grad():
        want = m(*args)
        got = torch.compile(m, backend="mla", options={"remainder": "eager", "form": form})(*args)
    assert rel_err(got, want) < TOL
    (rec,) = _records()
    assert rec.status == "rewritten" and rec.form == form and rec.shapes["T"] == T_ and rec.shapes["r"] == R_


def test_an_unforeseen_node_is_a_miss_naming_the_error():
    """torch.matmul(input=P, other=V) is a valid call with no positional operands: the anchor tests
    index args and fail; find_regions must turn that into a Miss, not raise."""
    g = fx.Graph()
    s = g.placeholder("s")
    v = g.placeholder("v")
    p = g.call_function(F.softmax, (s,), {"dim": -1})
    out = g.call_function(torch.matmul, (), {"input": p, "other": v})
    g.output(out)
    regions, misses = find_regions(fx.GraphModule(nn.Module(), g))
    assert regions == [] and len(misses) == 1
    assert "IndexError" in misses[0].reason and "left as written" in misses[0].reason



def _deepseek_v32_exp(optimize: int = -1, index_topk: int = 3):
    mod = shim.deepseek("v3.2-exp", optimize=optimize)
    args = mod.ModelArgs(max_batch_size=2, max_seq_len=16, dim=32, n_heads=4, q_lora_rank=24, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, index_n_heads=2,
                         index_head_dim=128, index_topk=index_topk)
    attn = mod.MLA(args)
    _init_(attn, seed=8)
    return mod, args, attn


def test_deepseek_v32_exp_is_a_logged_skip_naming_the_assert():
    """V3.2-Exp asserts on its indexer's top-k with an f-string message: Dynamo rewrites only asserts
    with a constant message, so the assert breaks the graph between the score products and the
    softmax. The graph that ends at the break names it and says what removes it (python -O)."""
    mod, args, attn = _deepseek_v32_exp()
    want, got = _run_deepseek(mod, args, attn, batch=2, prompt=5, steps=2, seed=9)
    for w, o in zip(want, got):
        assert rel_err(o, w) < TOL
    log = _records()
    assert log and all(r.status == "skipped" for r in log)
    reasons = [r.reason for r in log]
    cut = [r for r in reasons if "leave this graph at a graph break" in r]
    assert len(cut) == 2, reasons                                        # the prefill's and the decode's
    assert all("deepseek_v32_exp_model.py:479 `assert torch.all(topk_indices == topk_indices_)" in r
               and "PYTHONOPTIMIZE=1" in r for r in cut), cut
    assert any("the scores are an input of this graph" in r for r in reasons), reasons


@pytest.mark.parametrize("form", ["auto", "sparse_absorbed", "sparse_expanded"])
def test_deepseek_v32_exp_under_python_O_is_rewritten(form):
    """The file compiled as `python -O` compiles it (no asserts): one graph per call. Its index mask
    (-inf, scatter_ of 0 at the indexer's top-k, plus the causal mask in the prefill) is read as DSA:
    the prefill (expanded einsum) and the decode (absorbed einsum) regions carry the top-k, and the
    sparse forms, which attend only to the k selected keys, equal eager."""
    mod, args, attn = _deepseek_v32_exp(optimize=1)
    want, got = _run_deepseek(mod, args, attn, batch=2, prompt=5, steps=2, seed=9, form=form)
    for step, (w, o) in enumerate(zip(want, got)):
        assert rel_err(o, w) < TOL, f"step {step}: rel err {rel_err(o, w):.2e}"
    log = _records()
    assert len(log) == 2 and all(r.status == "rewritten" for r in log), [r.reason for r in log]
    assert all(r.shapes["k"] == 3 and r.shapes["r"] == 16 for r in log), [r.shapes for r in log]
    assert [r.shapes["S"] for r in log] == [5, 1]            # T = 5 in the prefill, 6.. in the decode: k < T
    if form != "auto":
        assert {r.form for r in log} == {form}


# --------------------------------------------------------------------------------------------- #
# A dense top-k index mask in other spellings: read as DSA (sparse forms forced, equal to eager) where
# it is proven exactly, else skipped, still equal.

class _IndexMasked(nn.Module):
    """DeepSeek's absorbed core with a top-k index mask added to the scores, built per `variant`."""

    H, R, DN, DR, DV, K = 3, 8, 4, 2, 5, 3

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.wkv_b = nn.Parameter(torch.randn(self.H * (self.DN + self.DV), self.R) / self.R ** 0.5)

    def forward(self, q_nope, q_pe, c, kp, mask, given_top):
        v, H, DN, DV, K = self.variant, self.H, self.DN, self.DV, self.K
        B, S, T = q_nope.shape[0], q_nope.shape[1], c.shape[1]
        w = self.wkv_b.view(H, -1, self.R)
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w[:, :DN])
        scores = (torch.einsum("bshc,btc->bsht", q_lat, c) + torch.einsum("bshr,btr->bsht", q_pe, kp)) * 0.3
        index_score = q_pe.sum((2, 3))[:, :, None] * c.sum(-1)[:, None, :] + mask      # [B, S, T]
        top = index_score.topk(K, dim=-1)[1]                                             # [B, S, K], distinct
        inf = float("-inf")
        if v == "scatter_":                       # V3.2's prefill, base mask added in place
            m = torch.full((B, S, T), inf).scatter_(-1, top, 0)
            m += mask
        elif v == "scatter":
            m = mask + torch.full((B, S, T), inf).scatter(2, top, 0.0)
        elif v == "torch_scatter_full_like":
            m = torch.scatter(torch.full_like(index_score, inf), -1, top, 0) + mask
        elif v == "scatter_statement":
            m = torch.full((B, S, T), inf)
            m.scatter_(-1, top, 0)
            m = m + mask
        elif v == "setitem_aranges_finfo_min":
            m = q_nope.new_full((B, S, T), torch.finfo(torch.float32).min)
            m[torch.arange(B)[:, None, None], torch.arange(S)[None, :, None], top] = 0
            m = m + mask
        elif v == "setitem_one_row":               # one selection for every row: mask[..., idx] = 0, idx 1-D
            m = torch.full((B, S, T), inf)
            m[..., top[0, 0]] = 0
        elif v == "setitem_union":                 # a [B, S, K] idx on the key axis: every row gets every selection
            m = torch.full((B, S, T), inf)
            m[..., top] = 0
        elif v == "wrong_fill":
            m = torch.full((B, S, T), -1e4).scatter_(-1, top, 0) + mask
        elif v == "nonzero_at_selection":
            m = torch.full((B, S, T), inf).scatter_(-1, top, 0.5) + mask
        elif v == "given_indices":                 # not provably distinct: a repeated index would count twice
            m = torch.full((B, S, T), inf).scatter_(-1, given_top, 0) + mask
        elif v == "query_axis":                    # zeros along the queries (S == K: every row gets some)
            m = torch.full((B, S, T), inf).scatter_(1, index_score.topk(S, dim=1)[1], 0) + mask
        elif v == "after_softmax":
            m = torch.full((B, S, T), inf).scatter_(-1, top, 0)
        if v == "after_softmax":                   # the selection applied to the probabilities instead
            p = scores.softmax(dim=-1) * (m == 0).unsqueeze(2)
        else:
            p = (scores + m.unsqueeze(2)).softmax(dim=-1)
        o = torch.einsum("bsht,btc->bshc", p, c)
        return torch.einsum("bshc,hdc->bshd", o, w[:, -DV:])


INDEX_MASK_VARIANTS = {
    "scatter_": "rewritten",
    "scatter": "rewritten",
    "torch_scatter_full_like": "rewritten",
    "scatter_statement": "rewritten",
    "setitem_aranges_finfo_min": "rewritten",
    "setitem_one_row": "rewritten",
    "setitem_union": "zeros the union of every row's selection",
    "wrong_fill": "fill value is -10000.0",
    "nonzero_at_selection": "not the constant 0",
    "given_indices": "not provably distinct",
    "query_axis": "not the key axis",
    "after_softmax": None,                     # no softmax feeds P @ c directly: not an attention region
}


@pytest.mark.parametrize("variant", sorted(INDEX_MASK_VARIANTS))
def test_index_mask_spellings(variant):
    torch.manual_seed(18)
    m = _IndexMasked(variant)
    g = torch.Generator().manual_seed(19)
    B, S, T = 2, 3, 8
    causal = torch.full((S, T), float("-inf")).triu_(T - S + 1)          # the last S of T positions
    args = (torch.randn(B, S, m.H, m.DN, generator=g), torch.randn(B, S, m.H, m.DR, generator=g),
            torch.randn(B, T, m.R, generator=g), torch.randn(B, T, m.DR, generator=g), causal,
            torch.randn(B, S, T, generator=g).topk(m.K, dim=-1)[1])
    expect = INDEX_MASK_VARIANTS[variant]
    with torch.no_grad():
        want = copy.deepcopy(m)(*args)
        got = torch.compile(m, backend="mla", options={"remainder": "eager", "form": "sparse"})(*args)
    assert rel_err(got, want) < TOL, (variant, rel_err(got, want))
    log = _records()
    if expect is None:
        assert all(r.status == "skipped" for r in log), [r.reason for r in log]
        return
    assert len(log) == 1, [r.reason for r in log]
    _as_expected(log[0], expect)
    if expect == "rewritten":
        assert log[0].form == "sparse_absorbed" and log[0].shapes["k"] == m.K, (log[0].form, log[0].reason)


# --------------------------------------------------------------------------------------------- #
# Near misses of DeepSeek's absorbed spelling: each is rewritten and equal, or skipped and equal.

class _Absorbed(nn.Module):
    """DeepSeek's absorbed MLA core over given tensors, with one thing changed per `variant`."""

    def __init__(self, variant: str, H=3, r=8, dn=4, dr=2, dv=5):
        super().__init__()
        self.variant, self.H, self.r, self.dn, self.dr, self.dv = variant, H, r, dn, dr, dv
        self.wkv_b = nn.Parameter(torch.randn(H * (dn + dv), r) / r ** 0.5)
        self.bias = nn.Parameter(torch.randn(r))
        self.register_buffer("cache", torch.zeros(2, 16, r))

    def forward(self, q_nope, q_pe, c, kp, mask):
        v, H, r, dn, dv = self.variant, self.H, self.r, self.dn, self.dv
        w = self.wkv_b.view(H, -1, r)
        w_uk, w_uv = w[:, :dn], w[:, -dv:]
        if v == "rope_rows_as_w_uv":            # another slice of the weight: still exactly MLA's math
            w_uv = w[:, :dv]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        if v == "bias_on_absorption":
            q_lat = q_lat + self.bias
        if v == "cached":                       # DeepSeek's buffer: written, then read twice
            B, T = c.shape[:2]
            self.cache[:B, :T] = c
            c = self.cache[:B, :T]
        if v == "bhsd_matmul":                  # the same math in [B, H, S, *] with matmul and a [B, 1, T, r] latent
            ql, qp = q_lat.transpose(1, 2), q_pe.transpose(1, 2)
            c4, kp4 = c.unsqueeze(1), kp.unsqueeze(1)
            scores = (torch.matmul(ql, c4.transpose(-1, -2)) + torch.matmul(qp, kp4.transpose(-1, -2))) * 0.3
            p = scores.softmax(-1)
            o = torch.matmul(p, c4)
            return torch.einsum("bhsc,hdc->bshd", o, w_uv)
        if v == "bmm_merged_heads":             # heads folded into the rows of bmm (as our own reference does)
            B, S, T = q_lat.shape[0], q_lat.shape[1], c.shape[1]
            rows = (torch.bmm(q_lat.reshape(B, S * H, r), c.transpose(1, 2))
                    + torch.bmm(q_pe.reshape(B, S * H, self.dr), kp.transpose(1, 2))) * 0.3
            p = (rows + mask.repeat_interleave(H, dim=0)).softmax(-1)
            o = torch.bmm(p, c).view(B, S, H, r)
            return torch.einsum("bshc,hdc->bshd", o, w_uv)
        if v == "permuted_latent":              # the scores read c with T and r swapped (T == r here)
            s_nope = torch.einsum("bshc,bct->bsht", q_lat, c)
        elif v == "key_first":
            s_nope = torch.einsum("btc,bshc->bsht", c, q_lat)
        else:
            s_nope = torch.einsum("bshc,btc->bsht", q_lat, c)
        if v == "per_head_rope_key":
            s_pe = torch.einsum("bshr,bthr->bsht", q_pe, kp.unsqueeze(2).expand(-1, -1, H, -1).contiguous())
        else:
            s_pe = torch.einsum("bshr,btr->bsht", q_pe, kp)
        if v == "scale_on_one_term":
            scores = s_nope * 0.3 + s_pe
        else:
            scores = (s_nope + s_pe) * 0.3
        if v == "per_head_mask":
            scores = scores + (mask.unsqueeze(1) + 0.1 * torch.arange(H).view(1, H, 1))     # [S, H, T]
        elif v == "dsa_index_mask":             # V3.2's decode: -inf but at an indexer's top-k, as [B, 1, 1, T]
            B, T = c.shape[:2]
            top = c.sum(-1).topk(3, dim=-1)[1].unsqueeze(1)                               # [B, 1, 3]
            index_mask = torch.full((B, 1, T), float("-inf")).scatter_(-1, top, 0)
            scores += index_mask.unsqueeze(2)
        else:
            scores += mask.unsqueeze(1)
        dim = 1 if v == "softmax_over_queries" else -1
        p = scores.softmax(dim=dim, dtype=torch.float32).type_as(q_nope)
        if v == "cached":
            self.cache[:1, :1] = 0.0             # a write between the two reads of the latent
            c = self.cache[:c.shape[0], :c.shape[1]]
        if v == "other_latent":
            c = c * 2
        o = torch.einsum("bsht,btc->bshc", p, c)
        return torch.einsum("bshc,hdc->bshd", o, w_uv)


VARIANTS = {
    "plain": "rewritten",
    "bmm_merged_heads": "axes merged by a reshape",
    "key_first": "rewritten",
    "bhsd_matmul": "rewritten",
    "rope_rows_as_w_uv": "rewritten",
    "permuted_latent": "read with its axes in different roles",
    "bias_on_absorption": "is not absorbed",
    "per_head_rope_key": "per-head key",
    "scale_on_one_term": "not products",
    "per_head_mask": "differs per head",
    "dsa_index_mask": "rewritten",
    "softmax_over_queries": "not only the softmax axis",
    "other_latent": "no score product reads the same latent",
    "cached": "no score product reads the same latent",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_absorbed_near_misses(variant):
    torch.manual_seed(10)
    m = _Absorbed(variant)
    g = torch.Generator().manual_seed(11)
    B, S, T = 2, 3, 8                                   # T == r, so a transposed latent has the right shape
    q_nope = torch.randn(B, S, m.H, m.dn, generator=g)
    q_pe = torch.randn(B, S, m.H, m.dr, generator=g)
    c = torch.randn(B, T, m.r, generator=g)
    kp = torch.randn(B, T, m.dr, generator=g)
    mask = torch.where(torch.rand(S, T, generator=g) < 0.3, float("-inf"), 0.0)
    mask[:, 0] = 0.0
    _as_expected(_one_record_equal_to_eager(m, (q_nope, q_pe, c, kp, mask), variant), VARIANTS[variant])


# --------------------------------------------------------------------------------------------- #
# Near misses of the expanded spelling (HF's and FlashInfer's): rewritten and equal, or skipped and equal.

class _Expanded(nn.Module):
    """An expanded MLA core (latent -> kv_b -> per-head K/V), with one thing changed per `variant`."""

    H, R, DN, DR, DV = 3, 8, 4, 2, 5

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.kv_b = nn.Linear(self.R, self.H * (self.DN + self.DV), bias=variant == "bias_on_expansion")

    def forward(self, q, c, kp):
        v, H, DN, DR, DV = self.variant, self.H, self.DN, self.DR, self.DV
        B, T = c.shape[0], c.shape[-2]
        if v == "latent_head_axis":
            c = c.unsqueeze(1)                                  # HF's cache layout [B, 1, T, r]
        kv = self.kv_b(c).view(B, T, H, DN + DV).transpose(1, 2)
        k_nope, val = torch.split(kv, [DN, DV], dim=-1)
        kp_h = kp.expand(-1, H, -1, -1)
        if v == "per_head_rope_key":
            kp_h = kp_h * torch.arange(1.0, H + 1).view(1, H, 1, 1)      # a different RoPE key per head
        if v == "k_by_cat":
            k = torch.cat([k_nope, kp_h], dim=-1)
        else:
            k = k_nope.new_empty(B, H, T, DN + DR)
            if v == "rope_on_wrong_half":
                k[..., :DR] = kp_h
                k[..., DR:] = k_nope
                q = torch.cat([q[..., DN:], q[..., :DN]], dim=-1)
            elif v == "k_by_setitem":
                k[:, :, :, :DN] = k_nope
                k[:, :, :, DN:] = kp                            # the write broadcasts the shared key
            else:
                k[..., :DN].copy_(k_nope)
                k[..., DN:].copy_(kp_h)
        if v == "dsa_index_mask":                              # DeepSeek's index mask in HF's layout
            top = (q.sum((1, 3))[:, :, None] * c.sum(-1)[:, None, :]).topk(2, dim=-1)[1]       # [B, S, 2]
            index_mask = torch.full((B, q.shape[2], T), float("-inf")).scatter_(-1, top, 0)
            p = F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.3 + index_mask[:, None], dim=-1)
            return torch.matmul(p, val)
        if v == "kt_by_permute":
            kt = k.permute(0, 1, 3, 2)
        elif v == "wrong_permute":                              # [B, T, D, H]: runs only because H == T
            kt = k.permute(0, 2, 3, 1)
        else:
            kt = k.transpose(2, 3)
        if v == "method_softmax":                             # DeepSeek's spelling of the softmax
            p = (torch.matmul(q, kt) * 0.3).softmax(dim=-1, dtype=torch.float32).type_as(q)
        else:
            p = F.softmax(torch.matmul(q, kt) * 0.3, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, val)


EXPANDED_VARIANTS = {
    "plain": "rewritten",
    "latent_head_axis": "rewritten",
    "k_by_cat": "rewritten",
    "k_by_setitem": "rewritten",
    "kt_by_permute": "rewritten",
    "method_softmax": "rewritten",
    "dsa_index_mask": "rewritten",
    "wrong_permute": "the key is not transposed",
    "bias_on_expansion": "has a bias",
    "rope_on_wrong_half": "pieces other than",
    "per_head_rope_key": "the RoPE key is not one shared [B, 1, T, dr] head",
}


@pytest.mark.parametrize("variant", sorted(EXPANDED_VARIANTS))
def test_expanded_near_misses(variant):
    torch.manual_seed(12)
    m = _Expanded(variant)
    g = torch.Generator().manual_seed(13)
    B, S, T = 2, 2, 3                                       # T == H: a wrong permute still runs
    q = torch.randn(B, m.H, S, m.DN + m.DR, generator=g)
    c = torch.randn(B, T, m.R, generator=g)
    kp = torch.randn(B, 1, T, m.DR, generator=g)
    form = "sparse" if variant == "dsa_index_mask" else "auto"
    rec = _one_record_equal_to_eager(m, (q, c, kp), variant, form=form)
    _as_expected(rec, EXPANDED_VARIANTS[variant])
    if form == "sparse":
        assert rec.form == "sparse_absorbed" and rec.shapes["k"] == 2, (rec.form, rec.shapes)


# --------------------------------------------------------------------------------------------- #
# DeepSeek's expanded spelling (V3.2-Exp's MHA prefill without its indexer): einsum over per-head K/V.

class _ExpandedEinsum(nn.Module):
    H, R, DN, DR, DV = 3, 8, 4, 2, 5

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.wkv_b = nn.Linear(self.R, self.H * (self.DN + self.DV), bias=variant == "bias_on_expansion")
        self.register_buffer("k_cache", torch.randn(2, 4, self.H, self.DN + self.DR))     # stale values
        self.register_buffer("v_cache", torch.randn(2, 4, self.H, self.DV))

    def forward(self, q_nope, q_pe, c, kp, mask):
        v, H, DN, DV = self.variant, self.H, self.DN, self.DV
        B, T = c.shape[:2]
        q = torch.cat([q_nope, q_pe], dim=-1)
        kv = self.wkv_b(c).view(B, T, H, DN + DV)
        k_nope, val = torch.split(kv, [DN, DV], dim=-1)
        kp_h = kp.expand(-1, -1, H, -1)
        if v == "per_head_rope_key":
            kp_h = kp_h * torch.arange(1.0, H + 1).view(1, 1, H, 1)
        k = torch.cat([kp_h, k_nope] if v == "rope_first_in_k" else [k_nope, kp_h], dim=-1)
        if v == "rope_first_in_k":
            q = torch.cat([q_pe, q_nope], dim=-1)
        if v.startswith("cache"):               # DeepSeek's naive prefill: K and V written whole, read back
            if v == "cache_stale_row":          # the last batch row is not written: it reads stale values
                self.k_cache[:B - 1, 0:T] = k[:B - 1]
                self.v_cache[:B - 1, 0:T] = val[:B - 1]
            else:
                self.k_cache[:B, 0:T] = k
                self.v_cache[:B, 0:T] = val
            if v == "cache_write_between":
                self.v_cache[:1, :1] = 0.0
            k, val = self.k_cache[:B, :T], self.v_cache[:B, :T]
        eq = "bshd,bhtd->bsht" if v == "permuted_k" else "bshd,bthd->bsht"   # T read as H: runs as T == H
        scores = torch.einsum(eq, q.float(), k.float()) * 0.4
        scores += mask.unsqueeze(1)
        scores = scores.softmax(dim=-1, dtype=torch.float32)
        return torch.einsum("bsht,bthd->bshd", scores.type_as(q), val)


EXPANDED_EINSUM_VARIANTS = {
    "plain": "rewritten",
    "permuted_k": "a permuted K",
    "per_head_rope_key": "not one shared key broadcast over heads",
    "rope_first_in_k": "not the first half of V's split",
    "bias_on_expansion": "has a bias",
    "cache_roundtrip": "rewritten",
    "cache_stale_row": "not exactly the region written",
    "cache_write_between": "not exactly the region written",
}


@pytest.mark.parametrize("variant,form", [(v, "auto") for v in sorted(EXPANDED_EINSUM_VARIANTS)]
                         + [("plain", "absorbed")])
def test_expanded_einsum_near_misses(variant, form):
    torch.manual_seed(14)
    m = _ExpandedEinsum(variant)
    g = torch.Generator().manual_seed(15)
    B, S = 2, 3                                             # S == T == H: a permuted K still runs
    args = (torch.randn(B, S, m.H, m.DN, generator=g), torch.randn(B, S, m.H, m.DR, generator=g),
            torch.randn(B, S, m.R, generator=g), torch.randn(B, S, 1, m.DR, generator=g),
            torch.full((S, S), float("-inf")).triu_(1))
    rec = _one_record_equal_to_eager(m, args, variant, form=form)
    _as_expected(rec, EXPANDED_EINSUM_VARIANTS[variant])
    if rec.status == "rewritten":
        assert rec.core == "einsum", rec.reason
        assert form == "auto" or rec.form == form


# --------------------------------------------------------------------------------------------- #
# Fuzz: the absorbed math in random layouts, letters and operand orders, sometimes with one
# subscript corrupted (two letters swapped). Every size is 3, batch included, so a corrupted product still
# runs and only structure can tell it apart: each case must be rewritten and equal, or skipped and
# equal; an uncorrupted case must be rewritten.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _layout(draw, roles):
    return "".join(draw(st.permutations(list(roles))))


@st.composite
def absorbed_case(draw):
    lay = {name: _layout(draw, roles) for name, roles in (
        ("q_nope", "bshd"), ("q_pe", "bshr"), ("lat", "btc"), ("kp", "btr"), ("w_uk", "hdc"), ("w_uv", "hec"),
        ("q_lat", "bshc"), ("scores", "bsht"), ("o_lat", "bshc"), ("out", "bshe"))}
    letters = draw(st.permutations(list("bshdrtcexyz")))       # any letters stand for the roles
    swap_first = [draw(st.booleans()) for _ in range(5)]         # operand order of each product
    corrupt = draw(st.sampled_from([None] + [(i, j) for i in range(5) for j in range(2)]))
    return lay, dict(zip("bshdrtce", letters)), swap_first, corrupt


def _equations(lay, letters, swap_first, corrupt):
    def sub(roles):
        return "".join(letters[c] for c in roles)
    prods = [(lay["q_nope"], lay["w_uk"], lay["q_lat"]), (lay["q_lat"], lay["lat"], lay["scores"]),
             (lay["q_pe"], lay["kp"], lay["scores"]), (lay["scores"], lay["lat"], lay["o_lat"]),
             (lay["o_lat"], lay["w_uv"], lay["out"])]
    eqs = []
    for k, (a, b, o) in enumerate(prods):
        ins = [sub(a), sub(b)]
        if corrupt is not None and corrupt[0] == k:             # swap the first two letters of one operand
            x = ins[corrupt[1]]
            ins[corrupt[1]] = x[1] + x[0] + x[2:]
        eqs.append((ins, sub(o), swap_first[k]))
    return eqs


class _FuzzAbsorbed(nn.Module):
    def __init__(self, eqs, scores_layout):
        super().__init__()
        self.eqs, self.t_axis = eqs, scores_layout.index("t")

    def _prod(self, k, a, b):
        (la, lb), lo, swap = self.eqs[k]
        if swap:
            return torch.einsum(f"{lb},{la}->{lo}", b, a)
        return torch.einsum(f"{la},{lb}->{lo}", a, b)

    def forward(self, q_nope, q_pe, c, kp, w_uk, w_uv, mask):
        q_lat = self._prod(0, q_nope, w_uk)
        scores = (self._prod(1, q_lat, c) + self._prod(2, q_pe, kp)) * 0.5 + mask
        p = scores.softmax(dim=self.t_axis, dtype=torch.float32)
        return self._prod(4, self._prod(3, p, c), w_uv)


@settings(max_examples=24, derandomize=True, deadline=None)
@given(absorbed_case())
def test_fuzz_absorbed_layouts(case):
    torch._dynamo.reset()
    mla_compile.reset()
    lay, letters, swap_first, corrupt = case
    eqs = _equations(lay, letters, swap_first, corrupt)
    m = _FuzzAbsorbed(eqs, lay["scores"])
    g = torch.Generator().manual_seed(16)
    size: dict[str, int] = {}

    def make(roles):
        return torch.randn(*[size.get(c, 3) for c in roles], generator=g)
    mask_shape = [1 if c == "h" else size.get(c, 3) for c in lay["scores"]]
    mask = torch.where(torch.rand(*mask_shape, generator=g) < 0.3, float("-inf"), 0.0)
    mask.select(lay["scores"].index("t"), 0).fill_(0.0)           # every row keeps one key
    args = (make(lay["q_nope"]), make(lay["q_pe"]), make(lay["lat"]), make(lay["kp"]), make(lay["w_uk"]),
            make(lay["w_uv"]), mask)
    rec = _one_record_equal_to_eager(m, args, eqs)
    if corrupt is None:
        assert rec.status == "rewritten", (eqs, rec.reason)


@st.composite
def expanded_case(draw):
    lay = {name: _layout(draw, roles) for name, roles in (("q", "bshk"), ("scores", "bsht"), ("out", "bshe"))}
    letters = dict(zip("bshtke", draw(st.permutations(list("bshtkexyz")))))
    swap_first = [draw(st.booleans()) for _ in range(2)]
    # a corruption swaps two size-3 axes (B, S, H, T) of one subscript, so the product still runs
    corrupt = draw(st.sampled_from([None, (0, 0), (0, 1), (1, 0), (1, 1)]))
    pair = draw(st.permutations(range(3)))[:2]       # every operand has at least three size-3 axes
    return lay, letters, swap_first, corrupt, sorted(pair)


class _FuzzExpanded(nn.Module):
    """DeepSeek's expanded spelling with Q, scores and output in the given layouts (K and V keep
    the expansion's own [B, T, H, *] order, which the view fixes)."""

    H, R, D = 3, 5, 3                            # dn = dr = dv = 3

    def __init__(self, eqs, scores_layout):
        super().__init__()
        self.eqs, self.t_axis = eqs, scores_layout.index("t")
        self.wkv_b = nn.Linear(self.R, self.H * 2 * self.D, bias=False)

    def forward(self, q, c, kp, mask):
        B, T = c.shape[:2]
        kv = self.wkv_b(c).view(B, T, self.H, 2 * self.D)
        k_nope, v = torch.split(kv, [self.D, self.D], dim=-1)
        k = torch.cat([k_nope, kp.expand(-1, -1, self.H, -1)], dim=-1)
        (la, lb), lo, swap = self.eqs[0]
        scores = torch.einsum(f"{lb},{la}->{lo}", k, q) if swap else torch.einsum(f"{la},{lb}->{lo}", q, k)
        p = (scores * 0.5 + mask).softmax(dim=self.t_axis)
        (la, lb), lo, swap = self.eqs[1]
        return torch.einsum(f"{lb},{la}->{lo}", v, p) if swap else torch.einsum(f"{la},{lb}->{lo}", p, v)


@settings(max_examples=20, derandomize=True, deadline=None)
@given(expanded_case())
def test_fuzz_expanded_layouts(case):
    torch._dynamo.reset()
    mla_compile.reset()
    lay, letters, swap_first, corrupt, pair = case

    def sub(roles):
        return "".join(letters[c] for c in roles)
    eqs = [[[sub(lay["q"]), sub("bthk")], sub(lay["scores"]), swap_first[0]],
           [[sub(lay["scores"]), sub("bthe")], sub(lay["out"]), swap_first[1]]]
    if corrupt is not None:
        ins = eqs[corrupt[0]][0]
        x = list(ins[corrupt[1]])
        small = [i for i, c in enumerate(x) if c not in (letters["k"], letters["e"])]
        i, j = small[pair[0]], small[pair[1]]
        x[i], x[j] = x[j], x[i]
        ins[corrupt[1]] = "".join(x)
    m = _FuzzExpanded(eqs, lay["scores"])
    g = torch.Generator().manual_seed(17)
    q = torch.randn(*[6 if c == "k" else 3 for c in lay["q"]], generator=g)
    mask_shape = [1 if c == "h" else 3 for c in lay["scores"]]
    mask = torch.where(torch.rand(*mask_shape, generator=g) < 0.3, float("-inf"), 0.0)
    mask.select(lay["scores"].index("t"), 0).fill_(0.0)
    args = (q, torch.randn(3, 3, m.R, generator=g), torch.randn(3, 3, 1, m.D, generator=g), mask)
    rec = _one_record_equal_to_eager(m, args, eqs)
    if corrupt is None:
        assert rec.status == "rewritten", (eqs, rec.reason)
