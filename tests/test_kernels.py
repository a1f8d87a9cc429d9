"""The Triton kernels against the plain-torch references (float64), on CPU under the Triton interpreter.

Without CUDA, TRITON_INTERPRET=1 is set here before the kernel modules are imported (triton 3.9 picks
the interpreter when `@triton.jit` decorates, i.e. at import): the kernels then run on CPU tensors.
With CUDA the same tests run on the GPU, and the `gpu` tests add real DeepSeek-V3 sizes.
Interpreter limits: its tl.dot gives garbage for bfloat16 (triton 3.9), so CPU tests use float32
and float16; bfloat16 is covered by the GPU tests.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    # A kernel module imported earlier without the interpreter would hold compiled-only kernels.
    for name in [n for n in sys.modules if n.startswith("mla_compile.kernels.")]:
        del sys.modules[name]
    import mla_compile.kernels.registry as _k

    _k._KERNELS.clear()
    _k._LOADED = False

triton = pytest.importorskip("triton")

from mla_compile.kernels.absorbed_decode import absorbed_decode, absorbed_latent_attention  # noqa: E402
from mla_compile.kernels.expanded_prefill import expanded_prefill  # noqa: E402
from mla_compile.kernels.sparse_decode import sparse_absorbed_decode  # noqa: E402
from mla_compile.passes.forms.absorbed import absorbed_reference  # noqa: E402
from mla_compile.passes.forms.expanded import expanded_reference  # noqa: E402
from mla_compile.passes.forms.sparse import sparse_absorbed_reference  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"


def make(B, H, S, T, r=32, dr=16, dn=16, dv=8, dtype=torch.float32, device=DEV, seed=0, latent_4d=True):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    lat_shape = (B, 1, T) if latent_4d else (B, T)
    qn, qr = rn(B, H, S, dn), rn(B, H, S, dr)
    c, kr = rn(*lat_shape, r), rn(*lat_shape, dr)
    w = rn(H * (dn + dv), r) / r ** 0.5                       # kv_b_proj.weight
    wv = w.view(H, dn + dv, r)
    return qn, qr, c, kr, wv[:, :dn], wv[:, dn:]


def f64(x):
    if x is None or not isinstance(x, torch.Tensor):
        return x
    return x.cpu() if x.dtype == torch.bool or not x.is_floating_point() else x.double().cpu()


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tol(dtype):
    return {torch.float32: 1e-4 if not HAS_CUDA else 1e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


def masks(kind, B, S, T, device=DEV, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, 1, S, T, generator=g) > 0.3
        m[..., 0] = True                                      # no fully masked row
        return m.to(device)
    if kind == "float":
        return (torch.randn(B, 1, S, T, generator=g)).to(device)
    if kind == "float2d":                                     # broadcast over batch, HF-style min
        m = torch.zeros(S, T).masked_fill(torch.rand(S, T, generator=g) > 0.7, torch.finfo(torch.float32).min)
        m[:, 0] = 0
        return m.to(device)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------
# absorbed decode

ABSORBED_CASES = [
    # B, H, S, T, dr, mask, causal, dtype
    (2, 3, 1, 37, 16, None, False, torch.float32),
    (1, 5, 1, 1, 16, None, False, torch.float32),            # T = 1
    (2, 20, 1, 50, 0, "bool", False, torch.float32),         # dr = 0, H = 20
    (1, 5, 3, 41, 16, "float", False, torch.float16),        # S > 1, float mask
    (2, 3, 4, 30, 16, "float2d", True, torch.float32),       # causal + broadcast float mask
    (1, 3, 5, 20, 16, None, True, torch.float32),            # causal only
]


@pytest.mark.parametrize("B,H,S,T,dr,mask,causal,dtype", ABSORBED_CASES)
def test_absorbed(B, H, S, T, dr, mask, causal, dtype):
    args = make(B, H, S, T, dr=dr, dtype=dtype, latent_4d=(B != 1))
    m = masks(mask, B, S, T)
    out = absorbed_decode(*args, m, 0.17, causal)
    assert out.shape == (B, H, S, 8) and out.dtype == dtype
    ref = absorbed_reference(*map(f64, args), f64(m), 0.17, causal)
    assert rel_err(out, ref) < tol(dtype)


def test_absorbed_kv_lens_and_forced_splits():
    B, H, S, T = 3, 5, 1, 70
    qn, qr, c, kr, wuk, wuv = make(B, H, S, T)
    q_lat = torch.einsum("bhsd,hdr->bhsr", qn, wuk)
    lens = torch.tensor([70, 23, 1], dtype=torch.int32, device=DEV)
    for splits in (1, 3):
        o = absorbed_latent_attention(q_lat, qr, c, kr, None, 0.2, False, kv_lens=lens, num_splits=splits)
        for b in range(B):
            n = int(lens[b])
            sc = (q_lat[b, :, 0] @ c[b, 0, :n].T + qr[b, :, 0] @ kr[b, 0, :n].T) * 0.2
            ref = torch.softmax(sc.double(), -1) @ c[b, 0, :n].double()
            assert rel_err(o[b, :, 0], ref.cpu()) < 1e-4


def test_absorbed_many_splits_merge():
    B, H, S, T = 1, 3, 1, 2100                                 # 17 splits: more than one merge block
    qn, qr, c, kr, wuk, wuv = make(B, H, S, T, latent_4d=False)
    q_lat = torch.einsum("bhsd,hdr->bhsr", qn, wuk)
    one = absorbed_latent_attention(q_lat, qr, c, kr, None, 0.2, False, num_splits=1)
    many = absorbed_latent_attention(q_lat, qr, c, kr, None, 0.2, False, num_splits=30)
    assert rel_err(many, one.double().cpu()) < 1e-5


@pytest.mark.parametrize("T,splits", [(300, 5), (1280, 20)], ids=["one-pass", "two-pass"])
def test_merge_passes_against_float64(T, splits):
    # the merge's one-pass (splits fit one block of 8 lanes: padding) and two-pass (20 splits, more
    # than its 16-lane block) forms against float64 attention over each batch's valid, allowed keys;
    # batch 1's rows mix splits with keys and splits past its valid length (m = -inf, l = 0); batch 2
    # allows no key at all (zeros)
    B, H, S = 3, 3, 1
    qn, qr, c, kr, wuk, wuv = make(B, H, S, T)
    q_lat = torch.einsum("bhsd,hdr->bhsr", qn, wuk)
    lens = torch.tensor([T, 100, 50], dtype=torch.int32, device=DEV)
    m = torch.rand(B, 1, 1, T, generator=torch.Generator().manual_seed(5)) > 0.3
    m[2] = False
    o = absorbed_latent_attention(q_lat, qr, c, kr, m.to(DEV), 0.2, False, kv_lens=lens, num_splits=splits)
    from mla_compile.kernels import absorbed_decode

    plan = absorbed_decode.launch_plan(torch.device(DEV), q_lat.dtype, B, H, S, T, q_lat.shape[-1], qr.shape[-1],
                                       False, splits)
    assert plan.splits == splits
    ql, qrd, cd, krd = (f64(x).cpu() for x in (q_lat, qr, c, kr))
    for b in range(B):
        n = int(lens[b])
        allowed = m[b, 0, 0, :n]
        if not bool(allowed.any()):                            # a row with no allowed key: zeros
            assert o[b].abs().max().item() == 0
            continue
        sc = (ql[b, :, 0] @ cd[b, 0, :n].T + qrd[b, :, 0] @ krd[b, 0, :n].T) * 0.2
        ref = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1) @ cd[b, 0, :n]
        assert rel_err(o[b, :, 0], ref) < 1e-5


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_expanded_free_blocks_after_a_partial_one(kind):
    # key block 0 partly masked, the blocks after it entirely allowed: they are listed (not the free
    # prefix) and take the attention kernel's predicated-off mask load
    B, H, S, T = 1, 3, 20, 70
    args = make(B, H, S, T)
    if kind == "bool":
        m = torch.ones(B, 1, S, T, dtype=torch.bool)
        m[..., 3] = False
    else:
        m = torch.zeros(B, 1, S, T)
        m[..., 3] = torch.finfo(torch.float32).min
    m = m.to(DEV)
    out = expanded_prefill(*args, m, 0.19, False)
    ref = expanded_reference(*map(f64, args), f64(m), 0.19, False)
    assert rel_err(out, ref) < 1e-4


def test_absorbed_fully_masked_row_is_zero():
    B, H, S, T = 1, 3, 2, 20
    args = make(B, H, S, T)
    m = torch.ones(B, 1, S, T, dtype=torch.bool, device=DEV)
    m[0, 0, 1] = False
    out = absorbed_decode(*args, m, 0.3, False)
    ref = absorbed_reference(*map(f64, args), m.cpu(), 0.3, False)
    assert out[:, :, 1].abs().max() == 0
    assert rel_err(out, ref) < 1e-4


def hf_min_rows_case(B, S, T, min_value, device=DEV, seed=7):
    """An HF-style float mask [B, 1, S, T]: finfo.min on ~30% of the keys (key 0 kept) of every row but
    query 0 of batch 1, which is finfo.min on every key (HF's eager softmax over equal scores then
    averages all the valid keys)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(B, 1, S, T).masked_fill(torch.rand(B, 1, S, T, generator=g) > 0.7, min_value)
    m[..., 0] = 0
    m[1, 0, 0] = min_value
    return m.to(device)


def softmax_ref_f64(q_lat, qr, c, kr, mask, scale, lens):
    """Plain softmax over x = (q_lat . c + q_rope . kr) * scale + mask in float64, keys past lens[b]
    dropped: [B, H, S, r]. c, kr are [B, T, *]."""
    q_lat, qr, c, kr, mask = (t.double().cpu() for t in (q_lat, qr, c, kr, mask))
    out = torch.zeros(q_lat.shape, dtype=torch.float64)
    for b in range(q_lat.shape[0]):
        n = int(lens[b])
        x = (q_lat[b] @ c[b, :n].T + qr[b] @ kr[b, :n].T) * scale + mask[b, :, :, :n]   # [H, S, n]
        out[b] = torch.softmax(x, -1) @ c[b, :n]
    return out


@pytest.mark.parametrize("min_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_lens", [False, True])
def test_absorbed_hf_min_row_uneven_splits(min_dtype, with_lens):
    """A query row masked everywhere by HF's finfo.min float mask, its keys spread over splits of
    different sizes (T = 150 in chunks of 64: 64 + 64 + 22 keys; with kv_lens 97 valid keys: 64 + 33).
    Every split sees the same max m = finfo.min, and m + log(l) rounds to m in fp32: a merge through
    lse weighs the splits equally (the mean of the split means) instead of by their key counts."""
    B, H, S, T, scale = 3, 3, 2, 150, 0.2
    qn, qr, c, kr, wuk, _ = make(B, H, S, T, latent_4d=False)
    q_lat = torch.einsum("bhsd,hdr->bhsr", qn, wuk)
    m = hf_min_rows_case(B, S, T, torch.finfo(min_dtype).min)
    lens = torch.tensor([150, 97, 130], dtype=torch.int32, device=DEV) if with_lens else None
    ref = softmax_ref_f64(q_lat, qr, c, kr, m, scale, lens if with_lens else [T] * B)
    n1 = int(lens[1]) if with_lens else T
    assert torch.allclose(ref[1, :, 0], c[1, :n1].double().cpu().mean(0).expand(H, -1))   # the uniform average
    for splits in (3, 1):
        o = absorbed_latent_attention(q_lat, qr, c, kr, m, scale, False, kv_lens=lens, num_splits=splits)
        assert rel_err(o[1, :, 0], ref[1, :, 0]) < 1e-5, splits          # the fully masked row
        assert rel_err(o, ref) < 1e-4, splits


# ---------------------------------------------------------------------------------------------------
# sparse decode / prefill

SPARSE_CASES = [
    # B, H, S, T, k, dr, mask, causal, dtype
    (2, 3, 1, 37, 20, 16, None, False, torch.float32),
    (1, 5, 3, 50, 70, 0, None, True, torch.float32),          # dr = 0, causal, k > T (duplicates)
    (2, 20, 2, 40, 9, 16, "bool", False, torch.float16),
    (1, 3, 1, 1, 4, 16, "float", False, torch.float32),       # T = 1
]


@pytest.mark.parametrize("B,H,S,T,k,dr,mask,causal,dtype", SPARSE_CASES)
def test_sparse(B, H, S, T, k, dr, mask, causal, dtype):
    args = make(B, H, S, T, dr=dr, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, T, (B, S, k), generator=g, dtype=torch.int32)
    idx[..., 0] = 0
    idx = idx.to(DEV)
    m = masks(mask, B, S, T)
    out = sparse_absorbed_decode(*args, idx, m, 0.21, causal)
    ref = sparse_absorbed_reference(*map(f64, args), idx.cpu(), f64(m), 0.21, causal)
    assert rel_err(out, ref) < tol(dtype)


def test_sparse_forced_splits_and_all_minus_one():
    B, H, S, T, k = 1, 4, 2, 90, 130
    args = make(B, H, S, T)
    idx = torch.randint(0, T, (B, S, k), dtype=torch.int32)
    idx[0, 1] = -1                                              # the second query selects nothing
    idx = idx.to(DEV)
    from mla_compile.kernels.absorbed_decode import absorb
    q_lat = absorb(args[0], args[4], torch.float32)
    o = sparse_absorbed_decode(*args, idx, None, 0.3, False)
    ref = sparse_absorbed_reference(*map(f64, args), idx.cpu(), None, 0.3, False)
    assert rel_err(o, ref) < 1e-4
    assert o[:, :, 1].abs().max() == 0
    from mla_compile.kernels.sparse_decode import sparse_latent_attention
    o2 = sparse_latent_attention(q_lat, args[1], args[2], args[3], idx, None, 0.3, False, num_splits=3)
    o1 = sparse_latent_attention(q_lat, args[1], args[2], args[3], idx, None, 0.3, False, num_splits=1)
    assert rel_err(o2, o1.double().cpu()) < 1e-5


@pytest.mark.parametrize("min_dtype", [torch.bfloat16, torch.float32])
def test_sparse_hf_min_row_uneven_splits(min_dtype):
    """The sparse kernel's splits merge like the absorbed kernel's: a query whose every selected key is
    masked by HF's finfo.min averages them, over splits of 64 + 64 + 22 of its 150 selected keys."""
    from mla_compile.kernels.absorbed_decode import absorb
    from mla_compile.kernels.sparse_decode import sparse_latent_attention

    B, H, S, T, k, scale = 2, 3, 2, 200, 150, 0.25
    args = make(B, H, S, T)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(S)]) for _ in range(B)])
    idx = idx.to(torch.int32).to(DEV)
    m = hf_min_rows_case(B, S, T, torch.finfo(min_dtype).min)
    ref = sparse_absorbed_reference(*map(f64, args), idx.cpu(), f64(m), scale, False)
    sel = args[2][1, 0, idx[1, 0].long()].double().cpu()                   # batch 1, query 0: its selected rows
    o_ref_row = (sel.mean(0) @ f64(args[5])[:, :, :].transpose(1, 2))      # the uniform average, projected
    assert rel_err(ref[1, :, 0], o_ref_row) < 1e-9
    q_lat = absorb(args[0], args[4], torch.float32)
    o_lat = sparse_latent_attention(q_lat, args[1], args[2], args[3], idx, m, scale, False, num_splits=3)
    o_lat = o_lat.view(B, S, H, -1)
    assert rel_err(o_lat[1, 0], sel.mean(0).expand(H, -1)) < 1e-5          # the fully masked row
    out = sparse_absorbed_decode(*args, idx, m, scale, False)
    assert rel_err(out, ref) < 1e-4


def test_sparse_bad_indices_raise():
    args = make(1, 3, 1, 10)
    with pytest.raises(ValueError, match="topk_indices"):
        sparse_absorbed_decode(*args, torch.full((1, 1, 4), 10, dtype=torch.int32, device=DEV), None, 1.0, False)


# ---------------------------------------------------------------------------------------------------
# expanded prefill

EXPANDED_CASES = [
    # B, H, S, T, dr, mask, causal, dtype
    (1, 3, 20, 37, 16, None, True, torch.float32),
    (2, 2, 33, 33, 0, None, True, torch.float32),            # dr = 0
    (1, 5, 20, 37, 16, "bool", False, torch.float32),
    (1, 3, 40, 40, 16, "causal_min", False, torch.float32),  # HF's float causal mask (finfo.min)
    (2, 3, 24, 24, 16, "bool", True, torch.float16),
    (1, 5, 1, 30, 16, "float", False, torch.float32),        # S = 1
]


@pytest.mark.parametrize("B,H,S,T,dr,mask,causal,dtype", EXPANDED_CASES)
def test_expanded(B, H, S, T, dr, mask, causal, dtype):
    args = make(B, H, S, T, dr=dr, dtype=dtype)
    if mask == "causal_min":
        m = torch.full((S, T), torch.finfo(torch.float32).min).triu(1)[None, None].to(DEV)
    else:
        m = masks(mask, B, S, T)
    out = expanded_prefill(*args, m, 0.19, causal)
    ref = expanded_reference(*map(f64, args), f64(m), 0.19, causal)
    assert rel_err(out, ref) < tol(dtype)


def test_expanded_causal_mask_skips_triangle():
    from mla_compile.kernels.absorbed_decode import mask_view
    from mla_compile.kernels.expanded_prefill import blocks_for, block_map
    S = 64
    BM, BN = blocks_for(S, S)
    nM, nN = triton.cdiv(S, BM), triton.cdiv(S, BN)
    m = torch.full((S, S), torch.finfo(torch.float32).min, device=DEV).triu(1)[None, None]
    entries, counts = block_map(mask_view(m, 1, S, S), S, S, False, BM, BN)
    # HF's causal mask: query tile i keeps key blocks 0..i, the diagonal one partial, the rest free
    assert counts[..., 0].cpu().tolist() == [[min(i * BM // BN + BM // BN, nN) for i in range(nM)]]
    assert counts[..., 1].cpu().tolist() == [[i * BM // BN for i in range(nM)]]     # the free prefix
    for i in range(nM):
        got = entries[0, i, :counts[0, i, 0]].cpu().tolist()
        assert [e // 2 for e in got] == list(range(len(got)))
        assert [e % 2 for e in got][:-BM // BN] == [1] * (len(got) - BM // BN)   # below the diagonal: free
        assert got[-1] % 2 == 0                                                  # the diagonal: partial
    m[..., 3] = torch.finfo(torch.float32).min                  # key 3 masked: its block is partial
    entries, counts = block_map(mask_view(m, 1, S, S), S, S, False, BM, BN)
    assert entries[0, nM - 1, 0].item() == 0
    m[..., 5, :] = torch.finfo(torch.float32).min               # a fully masked row keeps every block
    entries, counts = block_map(mask_view(m, 1, S, S), S, S, False, BM, BN)
    assert counts[0, 5 // BM, 0].item() == nN


def _block_map_reference(m, S, T, is_causal, BM, BN):
    """The block map's contract in torch: per (batch, query tile) the live key blocks in order, each
    2 * block + (entirely allowed with zero bias), the live count, and the leading live-and-free run;
    out-of-range entries count as free, not allowed; a float-masked row with nothing allowed keeps
    every block of its tile."""
    is_bool = m.dtype == torch.bool
    B = m.shape[0]
    nM, nN = triton.cdiv(S, BM), triton.cdiv(T, BN)
    allowed = (m != 0) if is_bool else (m > torch.finfo(m.dtype).min / 2)
    free = allowed.clone() if is_bool else (m == 0)
    if is_causal:
        tri = torch.ones(S, T, dtype=torch.bool).tril()
        allowed, free = allowed & tri, free & tri
    pad = lambda x, v: torch.nn.functional.pad(x, (0, nN * BN - T, 0, nM * BM - S), value=v)  # noqa: E731
    a, f = pad(allowed, False), pad(free, True)
    row_dead = ~allowed.any(-1)                                              # [B, S]
    out = []
    for b in range(B):
        for i in range(nM):
            keep = (not is_bool) and bool(row_dead[b, i * BM:(i + 1) * BM].any())
            ents, prefix, run = [], 0, True
            for n in range(nN):
                ta, tf = a[b, i * BM:(i + 1) * BM, n * BN:(n + 1) * BN], f[b, i * BM:(i + 1) * BM, n * BN:(n + 1) * BN]
                live, all_free = bool(ta.any()), bool(tf.all())
                if live or keep:
                    ents.append(2 * n + int(live and all_free))
                run = run and live and all_free
                prefix += int(run)
            out.append((ents, prefix))
    return out


@pytest.mark.parametrize("kind", ["bool", "float", "bf16-broadcast"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("chunk", [None, 2])
def test_block_map_matches_reference(kind, is_causal, chunk):
    from mla_compile.kernels.absorbed_decode import mask_view
    from mla_compile.kernels.expanded_prefill import block_map
    B, S, T, BM, BN = 2, 37, 70, 16, 16
    g = torch.Generator().manual_seed(11 + 2 * int(is_causal) + (chunk or 0))
    if kind == "bool":
        m = torch.rand(B, S, T, generator=g) > 0.6
        m[:, :, :16] &= torch.ones(S, 16, dtype=torch.bool).tril()      # a causal-shaped corner
        m[0, 20:30] = True                                             # wholly allowed rows
        m[1, 4] = False                                                # a row with nothing allowed
    else:
        m = torch.where(torch.rand(B, S, T, generator=g) > 0.5, 0.0, torch.finfo(torch.float32).min)
        m[:, 16:32, :48] = 0.0                                         # free blocks, a leading run
        m[0, 33, :] = torch.finfo(torch.float32).min                   # a row masked everywhere
        m[1, 2, 5] = -3.0                                              # a bias: allowed, not free
        m[1, 7, 9] = float("-inf")
        if kind == "bf16-broadcast":      # one mask for both batches (stride 0), in bf16 (its finfo.min)
            m = m[:1].to(torch.bfloat16).masked_fill(m[:1] == torch.finfo(torch.float32).min,
                                                     torch.finfo(torch.bfloat16).min).expand(B, S, T)
    entries, counts = block_map(mask_view(m[:, None].to(DEV), B, S, T), S, T, is_causal, BM, BN, chunk)
    ref = _block_map_reference(m, S, T, is_causal, BM, BN)
    nM = triton.cdiv(S, BM)
    for b in range(B):
        for i in range(nM):
            ents, prefix = ref[b * nM + i]
            n = counts[b, i, 0].item()
            assert entries[b, i, :n].cpu().tolist() == ents, (b, i)
            assert counts[b, i, 1].item() == prefix, (b, i)


def test_unsplit_weights():
    qn, qr, c, kr, wuk, wuv = make(1, 3, 9, 9)
    args = (qn, qr, c, kr, wuk.contiguous(), wuv.contiguous())
    out = expanded_prefill(*args, None, 0.2, True)
    ref = expanded_reference(*map(f64, args), None, 0.2, True)
    assert rel_err(out, ref) < 1e-4


# ---------------------------------------------------------------------------------------------------
# the absorbed form's per-head projections (kernels/head_projection.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,M,K,N", [(3, 1, 16, 8), (2, 5, 40, 24), (3, 17, 24, 72), (1, 64, 72, 40)])
def test_per_head_matmul(H, M, K, N, dtype):
    """Against float64, on strided views as the absorbed op passes them (q_nope's rows through a
    permute, W_UV^T a transposed slice of kv_b_proj's weight, the output written through a permute);
    K and N off the block sizes, M from 1 to the kernel's limit."""
    from mla_compile.kernels.head_projection import per_head_matmul

    g = torch.Generator().manual_seed(H * 1000 + M)
    x = torch.randn(M, H, K, generator=g).to(DEV, dtype).transpose(0, 1)             # [H, M, K], strided
    w = (torch.randn(H, N + 3, K, generator=g) / K ** 0.5).to(DEV, dtype)[:, 1:N + 1].transpose(1, 2)
    y = torch.full((M, H, N), float("nan"), dtype=dtype, device=DEV).transpose(0, 1)
    per_head_matmul(x, w, y)
    ref = torch.bmm(f64(x), f64(w))
    assert rel_err(y, ref) < tol(dtype)
    with pytest.raises(ValueError, match="do not chain"):
        per_head_matmul(x, w.transpose(1, 2), y)


def test_absorbed_projections_bmm_past_row_limit():
    """Above the kernel's row limit (B * S > 64) the projections stay on torch.bmm: the op agrees with
    the reference on both sides of the limit."""
    from mla_compile.kernels import head_projection

    for B, S in ((4, 16), (5, 13)):      # 64 rows (the kernel), 65 (bmm)
        args = make(B, 2, S, 19)
        assert head_projection.takes(args[0], B * S) == (B * S <= head_projection.MAX_ROWS)
        out = absorbed_decode(*args, None, 0.3, True)
        ref = absorbed_reference(*[f64(a) for a in args], None, 0.3, True)
        assert rel_err(out, ref) < tol(torch.float32)


# ---------------------------------------------------------------------------------------------------
# head and rank sizes below 16 or off the multiples of 16 (tiny test configs): the pads must hold


@pytest.mark.parametrize("r,dn,dr,dv", [(8, 4, 2, 4), (24, 12, 0, 20), (40, 8, 6, 16), (16, 16, 8, 8)])
def test_odd_and_tiny_dims(r, dn, dr, dv):
    B, H, S, T = 2, 3, 3, 29
    args = make(B, H, S, T, r=r, dr=dr, dn=dn, dv=dv)
    m = masks("float2d", B, S, T)
    ref_args = [f64(a) for a in args]
    out = absorbed_decode(*args, m, 0.3, False)
    assert rel_err(out, absorbed_reference(*ref_args, f64(m), 0.3, False)) < tol(torch.float32)
    out = expanded_prefill(*args, m, 0.3, False)
    assert rel_err(out, expanded_reference(*ref_args, f64(m), 0.3, False)) < tol(torch.float32)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(-1, T, (B, S, 7), generator=g, dtype=torch.int32)
    idx[..., 0] = 0
    out = sparse_absorbed_decode(*args, idx.to(DEV), m, 0.3, False)
    assert rel_err(out, sparse_absorbed_reference(*ref_args, idx, f64(m), 0.3, False)) < tol(torch.float32)


# ---------------------------------------------------------------------------------------------------
# the ops, with the kernels chosen

@pytest.mark.parametrize("form", ["absorbed", "expanded", "sparse_absorbed"])
def test_opcheck(form, monkeypatch):
    monkeypatch.setenv("MLA_COMPILE_KERNELS", "triton")
    import mla_compile.passes.forms.ops  # noqa: F401  registers torch.ops.mla
    from mla_compile.kernels.registry import kernel_for

    assert kernel_for(form, torch.empty(0, device=DEV)) is not None
    B, H, S, T = 1, 3, 2, 17
    args = make(B, H, S, T)
    m = masks("bool", B, S, T)
    if form == "sparse_absorbed":
        idx = torch.randint(-1, T, (B, S, 5), dtype=torch.int32).to(DEV)
        full = (*args, idx, m, 0.3, False)
    else:
        full = (*args, m, 0.3, False)
    op = getattr(torch.ops.mla, form).default
    torch.library.opcheck(op, full, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    ref = {"absorbed": absorbed_reference, "expanded": expanded_reference,
           "sparse_absorbed": sparse_absorbed_reference}[form]
    assert rel_err(op(*full), ref(*map(f64, full[:-2]), 0.3, False)) < 1e-4


def test_hopper_kernel_size_rule():
    """Which sizes the two Hopper kernels take (the device check aside): one query, r=512, dr=64, a half
    dtype, not causal; the heads-major kernel 33+ heads, the keys-major one 1-32: every head count
    goes to exactly one of them, and registry.absorbed_core (what the op launches and the cost model
    costs) names that one, on sm_90 only."""
    from mla_compile.kernels import absorbed_decode_keys_major as keys_major
    from mla_compile.kernels import absorbed_decode_seesaw as seesaw
    from mla_compile.kernels.registry import absorbed_core

    bf = torch.bfloat16
    assert seesaw.takes_sizes(bf, 128, 1, 512, 64, False) and seesaw.takes_sizes(torch.float16, 33, 1, 512, 64, False)
    for kernel, H in ((seesaw, 128), (keys_major, 32)):
        for bad in (dict(S=2), dict(r=256), dict(dr=32), dict(dtype=torch.float32), dict(is_causal=True)):
            a = dict(dtype=bf, H=H, S=1, r=512, dr=64, is_causal=False)
            a.update(bad)
            assert not kernel.takes_sizes(**a), (kernel.__name__, bad)
            assert absorbed_core(a["dtype"], a["H"], a["S"], a["r"], a["dr"], a["is_causal"], sm90=True) == "triton"
    for H in range(1, 200):
        took = [k.takes_sizes(bf, H, 1, 512, 64, False) for k in (seesaw, keys_major)]
        assert took == ([False, True] if H <= 32 else [True, False]), H
        if seesaw.sm90.HAVE_GLUON:
            assert absorbed_core(bf, H, 1, 512, 64, False, sm90=True) == ("keys_major" if H <= 32 else "seesaw")
        assert absorbed_core(bf, H, 1, 512, 64, False, sm90=False) == "triton"
    assert keys_major.block_heads(16) == 16 and keys_major.block_heads(17) == keys_major.block_heads(32) == 32


def test_hopper_kernel_compiles_for_sm90(tmp_path):
    """The Gluon kernels run on Hopper GPUs only, but build anywhere: compile them ahead of time for
    sm_90 with the installed Triton (CI has no GPU; Gluon's names change between Triton versions, and
    this is where a rename shows) and check that it uses warpgroup MMAs and fits in shared memory.
    In a fresh process: this module may have set TRITON_INTERPRET=1, which Gluon's compiler breaks under."""
    import subprocess

    from mla_compile.kernels import sm90

    if not sm90.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    script = ("from mla_compile.kernels import absorbed_decode_keys_major as km\n"   # <= 32 heads
              "for bh, kind, one in ((16, 1, False), (32, 2, True), (32, 0, False)):\n"
              "    k = km.compile_for_sm90(bh, kind, one_split=one)\n"
              "    print(kind, 'wgmma.mma_async' in k.asm['ptx'], k.metadata.shared)\n"
              "from mla_compile.kernels import absorbed_decode_seesaw as ss\n"   # > 32 heads
              "for kind in (0, 1, 2):\n"
              "    k = ss.compile_for_sm90(kind, one_split=kind == 2)\n"
              "    print(kind, 'wgmma.mma_async' in k.asm['ptx'], k.metadata.shared)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)     # a cached build would hide a source that no longer compiles
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln.split() for ln in res.stdout.splitlines() if ln[:1] in "012"]
    assert [ln[:2] for ln in lines] == ([["1", "True"], ["2", "True"], ["0", "True"]]
                                        + [["0", "True"], ["1", "True"], ["2", "True"]]), res.stdout
    assert all(int(ln[2]) <= 232448 for ln in lines), res.stdout      # an H100/H200 block's shared memory


# ---------------------------------------------------------------------------------------------------
# real sizes on a GPU

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

V3 = dict(r=512, dr=64, dn=128, dv=128)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,S,T", [(2, 128, 1, 4096), (3, 16, 2, 4000), (1, 20, 1, 4096), (2, 32, 1, 4100)])
def test_gpu_absorbed(B, H, S, T, dtype):
    args = make(B, H, S, T, dtype=dtype, **V3)
    out = absorbed_decode(*args, None, 0.07, False)
    ref = absorbed_reference(*[a.double() for a in args], None, 0.07, False)
    assert rel_err(out, ref.cpu()) < tol(dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 8, 33, 64])
@pytest.mark.parametrize("which", ["absorb", "project"])
def test_gpu_per_head_matmul(which, M, dtype):
    """V3's projections at decode sizes (128 heads; W_UK [128, 512], W_UV^T [512, 128] as views of
    kv_b_proj's weight) against float64."""
    from mla_compile.kernels.head_projection import per_head_matmul

    g = torch.Generator().manual_seed(M)
    w = (torch.randn(128 * 256, 512, generator=g) / 512 ** 0.5).to(DEV, dtype).view(128, 256, 512)
    w, K = (w[:, :128], 128) if which == "absorb" else (w[:, 128:].transpose(1, 2), 512)
    x = torch.randn(M, 128, K, generator=g).to(DEV, dtype).transpose(0, 1)
    y = torch.empty(128, M, w.shape[2], dtype=dtype, device=DEV)
    per_head_matmul(x, w, y)
    assert rel_err(y, torch.bmm(f64(x), f64(w))) < tol(dtype) / 4


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,splits,T", [(128, None, 4100), (128, 9, 4100), (40, None, 4100), (64, 1, 700)])
def test_gpu_absorbed_hopper_path(H, splits, T, dtype):
    """The shapes the Hopper (Gluon) kernel takes on an H100/H200 (the Triton kernel elsewhere): per-row
    valid lengths, some of them shorter than a split (empty splits), the latent and RoPE parts as
    strided views of one [.., 576] cache row, and NaN in every unfilled slot: TMA must zero-fill past
    each valid length, since 0 x NaN in P V would poison the row. One split: the kernel writes the output."""
    q_lat, qr, c, kr = _check_absorbed_core_nan_tails(H, splits, T, dtype, None)
    _assert_gluon_core(q_lat, qr, c, kr, "seesaw")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mask", ["bool", "float2d", "hf_min"])
def test_gpu_absorbed_hopper_path_masks(mask):
    """HF's decode mask reaches the absorbed op under torch.compile ([B, 1, 1, T], bool or float with
    finfo.min): the Hopper kernel reads it per key tile. hf_min leaves one batch 5 keys of 3000 (whole
    splits see only finfo.min scores, whose exp must come out 0, not NaN from an overflow)."""
    B, H, T = 3, 128, 3000
    args = make(B, H, 1, T, dtype=torch.bfloat16, **V3)
    if mask == "hf_min":
        m = torch.zeros(B, 1, 1, T)
        m[:, :, :, 1000:2000] = torch.finfo(torch.bfloat16).min
        m[2, :, :, 5:] = torch.finfo(torch.bfloat16).min
        m = m.to(DEV, torch.bfloat16)
    else:
        m = masks(mask, B, 1, T)
    out = absorbed_decode(*args, m, 0.07, False)
    ref = absorbed_reference(*[a.double() for a in args], m if m.dtype == torch.bool else m.double(), 0.07, False)
    assert rel_err(out, ref.cpu()) < tol(torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("min_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_lens", [False, True])
def test_gpu_absorbed_hopper_path_hf_min_row_uneven_splits(min_dtype, with_lens):
    """test_absorbed_hf_min_row_uneven_splits at the Hopper kernel's sizes: batch 1 masked everywhere by
    HF's finfo.min (the mask in that dtype, as HF builds it), T = 4100 in 9 splits of 512 keys and
    one of 4 (or 777 valid keys: 512 + 265); its output must be the plain average of its valid keys."""
    from mla_compile.kernels.absorbed_decode import absorb

    B, H, S, T, scale, dtype = 3, 128, 1, 4100, 0.07, torch.bfloat16
    qn, qr, c, kr, wuk, _ = make(B, H, S, T, dtype=dtype, latent_4d=False, **V3)
    q_lat = absorb(qn, wuk, dtype)
    m = hf_min_rows_case(B, S, T, torch.finfo(min_dtype).min).to(min_dtype)
    lens = torch.tensor([4100, 777, 1], dtype=torch.int32, device=DEV) if with_lens else None
    ref = softmax_ref_f64(q_lat, qr, c, kr, m, scale, lens if with_lens else [T] * B)
    _assert_gluon_core(q_lat, qr, c, kr, "seesaw")
    for splits in (9, None):
        o = absorbed_latent_attention(q_lat, qr, c, kr, m, scale, False, kv_lens=lens, num_splits=splits)
        assert rel_err(o[1, :, 0], ref[1, :, 0]) < tol(dtype), splits       # the fully masked row
        assert rel_err(o, ref) < tol(dtype), splits


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,splits,T", [(32, None, 4100), (32, 9, 4100), (32, 1, 700), (20, None, 65536),
                                        (16, None, 4100), (16, 5, 333), (1, None, 4100), (8, 1, 64),
                                        (32, 2, 128), (16, 2, 300)])
@pytest.mark.parametrize("mask", [None, "bool", "hf_min"])
def test_gpu_absorbed_keys_major_path(H, splits, T, dtype, mask):
    """The keys-major Gluon kernel (<= 32 heads on an H100/H200): per-row valid lengths (one shorter
    than a split, one of a single key, one a whole 64-key tile), NaN in every unfilled slot of a
    [.., 576] cache row viewed as latent and RoPE, H below the MMA's 16/32 columns, one split (the
    kernel writes the output) and many, and HF's decode masks: bool, and float with finfo.min on
    every key of batch 1 (its output must be the plain average of its valid keys)."""
    _assert_gluon_core(*_check_absorbed_core_nan_tails(H, splits, T, dtype, mask), "keys_major")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,splits,T", [(128, None, 4100), (128, 9, 4100), (128, 1, 700), (40, None, 4100),
                                        (64, 3, 333), (128, 1, 64), (128, 2, 4100)])
@pytest.mark.parametrize("mask", [None, "bool", "hf_min"])
def test_gpu_absorbed_seesaw_path(H, splits, T, dtype, mask):
    """The heads-major kernel on FlashMLA's schedule, the same cases: odd tile counts (a pair's second
    tile past the split's end), splits of one tile, a single key (a pair wholly masked but for one
    key), empty splits past a short valid length."""
    _assert_gluon_core(*_check_absorbed_core_nan_tails(H, splits, T, dtype, mask), "seesaw")


def _assert_gluon_core(q_lat, qr, c, kr, core):
    """On an H100/H200 these inputs took the Gluon kernel `core` (the plan the op launches by)."""
    from mla_compile.kernels import sm90
    from mla_compile.kernels.absorbed_decode import launch_plan

    if torch.cuda.get_device_capability() != (9, 0):
        return
    B, H, S, r = q_lat.shape
    plan = launch_plan(q_lat.device, q_lat.dtype, B, H, S, c.shape[-2], r, kr.shape[-1], False)
    assert plan.core == core and sm90.tma_ready(q_lat, qr, c, kr), plan


def _check_absorbed_core_nan_tails(H, splits, T, dtype, mask):
    """The absorbed core against float64, batch by batch, over a [.., 576] cache row viewed as latent
    and RoPE with valid lengths T, 777, 1, 64 and NaN in every slot past them; returns the inputs."""
    from mla_compile.kernels.absorbed_decode import absorb, absorbed_latent_attention

    B = 4
    qn, qr, _, _, wuk, _ = make(B, H, 1, T, dtype=dtype, **V3)
    g = torch.Generator().manual_seed(11)
    kv = torch.randn(B, 1, T, 576, generator=g).to(DEV, dtype)
    lens = torch.tensor([T, min(T, 777), 1, 64], dtype=torch.int32, device=DEV)
    for b in range(B):
        kv[b, :, int(lens[b]):] = float("nan")
    c, kr = kv[..., :512], kv[..., 512:]
    if mask == "hf_min":
        m = hf_min_rows_case(B, 1, T, torch.finfo(dtype).min).to(dtype)
    elif mask == "bool":
        m = masks("bool", B, 1, T)
    else:
        m = None
    q_lat = absorb(qn, wuk, dtype)
    out = absorbed_latent_attention(q_lat, qr, c, kr, m, 0.07, False, kv_lens=lens, num_splits=splits)
    add = torch.zeros(B, 1, 1, T)                     # the reference takes an additive mask
    if m is not None:
        add = add.masked_fill(~m.cpu(), float("-inf")) if m.dtype == torch.bool else m
    ref = softmax_ref_f64(q_lat, qr, c[:, 0], kr[:, 0], add, 0.07, lens.tolist())
    for b in range(B):
        assert rel_err(out[b], ref[b]) < tol(dtype), b
    return q_lat, qr, c, kr


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,H,S,T,k", [(2, 128, 1, 8192, 2048), (1, 32, 64, 4096, 2048)])
def test_gpu_sparse(B, H, S, T, k):
    args = make(B, H, S, T, dtype=torch.bfloat16, **V3)
    idx = torch.randint(-1, T, (B, S, k), dtype=torch.int32, device=DEV)
    out = sparse_absorbed_decode(*args, idx, None, 0.07, False)
    ref = sparse_absorbed_reference(*[a.double() for a in args], idx, None, 0.07, False)
    assert rel_err(out, ref.cpu()) < tol(torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mask", [None, "causal_min"])
def test_gpu_expanded(mask):
    B, H, S, T = 1, 128, 4096, 4096
    args = make(B, H, S, T, dtype=torch.bfloat16, **V3)
    m = None
    if mask == "causal_min":
        m = torch.full((S, T), torch.finfo(torch.bfloat16).min, device=DEV).triu(1).to(torch.bfloat16)[None, None]
    out = expanded_prefill(*args, m, 0.07, m is None)
    ref = expanded_reference(*[a.float() for a in args], None if m is None else m.float(), 0.07, m is None)
    assert rel_err(out, ref.double().cpu()) < tol(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["sparse", "absorbed"])
def test_gpu_offsets_past_int32(form):
    """q_lat is an [H, B*S, r] view: head x stride passes 2**31 elements at B*S = 2**18, H = 32, r = 512
    (a DSA prefill chunk); the kernels must address it in 64 bits (this crashed the GPU before)."""
    from mla_compile.kernels.absorbed_decode import absorb, absorbed_latent_attention
    from mla_compile.kernels.sparse_decode import sparse_latent_attention
    B, H, S, T, k, r, dr = 32, 32, 8192, 64, 16, 512, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    rn = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q_lat = torch.empty(H, B * S, r, device="cuda", dtype=torch.bfloat16).view(H, B, S, r).permute(1, 0, 2, 3)
    q_lat.copy_(rn(B, H, S, r))
    assert q_lat.stride(1) * (H - 1) > 2**31
    qr, c, kr = rn(B, H, S, dr), rn(B, T, r), rn(B, T, dr)
    if form == "sparse":
        idx = torch.randint(0, T, (B, S, k), device="cuda", dtype=torch.int32, generator=g)
        o = sparse_latent_attention(q_lat, qr, c, kr, idx, None, 0.05, False).view(B, S, H, r)
        for b, s in ((0, 0), (B - 1, S - 1), (7, 4321)):
            sel = idx[b, s].long()
            sc = (q_lat[b, :, s].float() @ c[b, sel].float().T + qr[b, :, s].float() @ kr[b, sel].float().T) * 0.05
            ref = torch.softmax(sc, -1) @ c[b, sel].float()
            assert rel_err(o[b, s], ref.double().cpu()) < 2e-2
    else:
        o = absorbed_latent_attention(q_lat, qr, c, kr, None, 0.05, False)
        for b, s in ((0, 0), (B - 1, S - 1), (7, 4321)):
            sc = (q_lat[b, :, s].float() @ c[b].float().T + qr[b, :, s].float() @ kr[b].float().T) * 0.05
            ref = torch.softmax(sc, -1) @ c[b].float()
            assert rel_err(o[b, :, s], ref.double().cpu()) < 2e-2


def test_hf_min_mask_runs_without_numpy_warnings():
    """HF's finfo.min mask overflows to -inf inside the online softmax, as IEEE arithmetic does on a
    GPU; under Triton's interpreter numpy would warn at each such overflow, a warning the user can do
    nothing about. The launch must be silent and the answer right."""
    import warnings

    B, H, S, T = 2, 3, 4, 30
    args = make(B, H, S, T)
    m = masks("float2d", B, S, T)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = absorbed_decode(*args, m, 0.17, True)
    assert rel_err(out, absorbed_reference(*map(f64, args), f64(m), 0.17, True)) < tol(torch.float32)
