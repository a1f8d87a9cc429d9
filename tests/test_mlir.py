"""MLIR export through torch-mlir (mla_compile.export_mlir): every output type for a tiny DeepSeek-V3
and a DSA family (deepseek_v32), the absorbed/sparse exports free of the expanded K/V width over the
sequence, the linalg module verified, and run on torch-mlir's reference CPU pipeline against eager.

Most tiny models here keep every MLP dense (first_k_dense_replace / mlp_layer_types) to stay small;
test_moe_model_lowers_whole runs HF's MoE layers (their histc, grouped matmul, unsorted top-k and
stable sort are decomposed by mla_compile.mlir), each decomposition is checked against torch, and an
op nothing lowers is an error that names it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_mlir.fx")

from mla_compile import mlir  # noqa: E402
from mla_compile.tiny import tiny_model  # noqa: E402

H, DN, DV, DR, R = 4, 24, 20, 8, 32          # widths chosen so H*dn (96) and H*(dn+dv) (176) are unique
T = 8
LOWERING = ("linalg-on-tensors", "stablehlo", "tosa")


def _model(family, **kw):
    return tiny_model(family, heads=H, qk_nope_head_dim=DN, v_head_dim=DV, qk_rope_head_dim=DR, kv_lora_rank=R,
                      vocab_size=100, layers=2, first_k_dense_replace=2, mlp_layer_types=["dense", "dense"], **kw)


def _ids():
    return torch.randint(3, 100, (1, T), generator=torch.Generator().manual_seed(0))


def _assert_runs_like_eager(model, linalg_text, ids):
    """The linalg module, run on torch-mlir's reference CPU pipeline, gives the model's eager logits."""
    (got,) = mlir.run_linalg(linalg_text, ids)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def _expanded(text):
    return mlir.expanded_kv_shapes(text, B=1, T=T, H=H, dn=DN, dv=DV)


@pytest.fixture(scope="module")
def v3():
    return _model("deepseek_v3")


@pytest.fixture(scope="module")
def v3_absorbed(v3):
    cap = mlir.capture(v3, _ids(), form="absorbed")
    return {ot: mlir.lower(cap, ot) for ot in mlir.OUTPUT_TYPES}


def test_v3_absorbed_every_output_type(v3_absorbed):
    for ot, res in v3_absorbed.items():
        assert "func.func @main" in res.text, ot
        assert [r.form for r in res.records] == ["absorbed", "absorbed"]
        assert not _expanded(res.text), f"{ot}: expanded K/V tensors {_expanded(res.text)}"
    assert v3_absorbed["torch"].text.count('torch.operator "torch.mla.absorbed"') == 2
    for ot in LOWERING:
        assert "torch.mla" not in v3_absorbed[ot].text and "torch.operator" not in v3_absorbed[ot].text
    assert "linalg.batch_matmul" in v3_absorbed["linalg-on-tensors"].text
    assert "stablehlo." in v3_absorbed["stablehlo"].text and "tosa." in v3_absorbed["tosa"].text


def test_v3_expanded_control(v3):
    # The check above would be vacuous if it could not see an expansion: the expanded form shows one.
    text = mlir.export_mlir(v3, _ids(), output_type="linalg-on-tensors", form="expanded")
    assert _expanded(text)


def test_v3_torch_decomposed_backend_contract(v3):
    text = mlir.export_mlir(v3, _ids(), output_type="torch", form="absorbed", decompose=True)
    assert "torch.mla" not in text and "torch.aten.bmm" in text and not _expanded(text)


def test_v3_linalg_verifies_and_runs(v3, v3_absorbed):
    text = v3_absorbed["linalg-on-tensors"].text
    assert mlir.verify(text)
    why = mlir.runner_available()
    if why:
        pytest.skip(why)
    _assert_runs_like_eager(v3, text, _ids())


def test_v3_auto_uses_the_static_decision(v3):
    cap = mlir.capture(v3, _ids(), form="auto")
    assert cap.forms() and all(f in ("expanded", "absorbed") for f in cap.forms())
    assert "torch.mla" not in mlir.lower(cap, "tosa").text


def test_v32_sparse_every_output_type():
    m = _model("deepseek_v32", index_topk=4)            # T = 8 > k = 4: a real selection
    cap = mlir.capture(m, _ids(), form="sparse")
    assert cap.forms() == ["sparse_absorbed", "sparse_absorbed"]
    for ot in mlir.OUTPUT_TYPES:
        text = mlir.lower(cap, ot).text
        assert "func.func @main" in text
        assert not _expanded(text), ot
        if ot == "torch":
            assert text.count('"torch.mla.sparse_absorbed"') == 2
        else:
            assert "torch.mla" not in text
        if ot == "linalg-on-tensors":
            assert mlir.verify(text)
    # No numeric check at T > k: the indexer's scores pass through ReLU, so exact ties (zeros) are
    # common in a tiny random model and top-k's choice among them is implementation-defined
    # (torch-mlir and torch pick different tied keys). At T <= k below, the selection is exact.


@pytest.mark.parametrize("form", ["sparse", "auto"])
def test_v32_linalg_runs_and_matches(form):
    why = mlir.runner_available()
    if why:
        pytest.skip(why)
    m = _model("deepseek_v32", index_topk=T)
    ids = _ids()
    cap = mlir.capture(m, ids, form=form)
    text = mlir.lower(cap, "linalg-on-tensors").text
    assert mlir.verify(text)
    (got,) = mlir.run_linalg(text, ids)
    with torch.no_grad():
        want = m(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_bad_arguments(v3):
    with pytest.raises(ValueError, match="output_type"):
        mlir.export_mlir(v3, _ids(), output_type="llvm")
    with pytest.raises(ValueError, match="form"):
        mlir.export_mlir(v3, _ids(), form="flash")


# --------------------------------------------------------------------------------------------- #
# MoE models, per-region export, and ops torch-mlir cannot lower


def test_moe_model_lowers_whole():
    """HF's default MoE layers (router top-k, histc token counts, grouped expert matmuls) lower to
    linalg, and the module computes what eager does."""
    why = mlir.runner_available()
    if why:
        pytest.skip(why)
    m = tiny_model("deepseek_v3", heads=H, qk_nope_head_dim=DN, v_head_dim=DV, qk_rope_head_dim=DR,
                   kv_lora_rank=R, vocab_size=100, layers=2)
    assert any("experts" in name for name, _ in m.named_modules())
    ids = _ids()
    _assert_runs_like_eager(m, mlir.export_mlir(m, ids, output_type="linalg-on-tensors", form="absorbed"), ids)


def test_regions_export_alone_and_compute_the_op(v3):
    cap = mlir.capture(v3, _ids(), form="absorbed")
    regions = mlir.regions(cap)
    assert list(regions) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    texts = mlir.export_mlir_regions(v3, _ids(), output_type="torch", form="absorbed")
    assert list(texts) == list(regions)
    assert all(t.count('"torch.mla.absorbed"') == 1 for t in texts.values())
    why = mlir.runner_available()
    if why:
        pytest.skip(why)
    region = regions["model.layers.1.self_attn"]
    text = mlir.lower_region(cap, region, "linalg-on-tensors")
    assert not _expanded(text)
    tensors = [a for a in region.args if isinstance(a, torch.Tensor)]
    (got,) = mlir.run_linalg(text, *tensors)
    with torch.no_grad():
        want = region.node.target(*region.args)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


class _WithZeta(torch.nn.Module):
    """A model with an op torch-mlir has no lowering for, after the MLA attention."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, use_cache=False):
        logits = self.inner(ids, use_cache=use_cache).logits
        return torch.special.zeta(logits.abs() + 1.5, logits.abs() + 1.0)


def test_unlowerable_op_is_named_with_its_origin(v3, capfd):
    model = _WithZeta(v3)
    with pytest.raises(mlir.MLIRExportError) as err:
        mlir.export_mlir(model, _ids(), output_type="tosa", form="absorbed")
    message = str(err.value)
    assert "aten.special_zeta" in message and "test_mlir.py" in message and "export_mlir_regions" in message
    assert "error:" not in capfd.readouterr().err          # stopped before the pass pipeline's diagnostics
    # the attention itself still exports
    texts = mlir.export_mlir_regions(model, _ids(), output_type="tosa", form="absorbed")
    assert len(texts) == 2 and all("tosa." in t and "torch.mla" not in t for t in texts.values())


def test_decompositions_match_torch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, generator=g) * 3
    for bins, lo, hi in [(7, -2.0, 2.0), (5, 0, 0), (4, 0, 3)]:
        assert torch.equal(mlir._histc(x, bins, lo, hi), torch.histc(x, bins, lo, hi))
    same = torch.full((5,), 2.0)
    assert torch.equal(mlir._histc(same, 3, 0, 0), torch.histc(same, 3, 0, 0))
    for v in [torch.randint(0, 4, (3, 17), generator=g), torch.randn(2, 9, 5, generator=g)]:
        for descending in (False, True):
            for dim in (-1, 0):
                want = torch.sort(v, dim=dim, descending=descending, stable=True)
                got = mlir._stable_sort(v, True, dim, descending)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    scores = torch.randn(8, 6, generator=g)
    values, indices = mlir._topk(scores, 3, -1, True, False)
    assert torch.equal(values, torch.topk(scores, 3).values) and torch.equal(indices, torch.topk(scores, 3).indices)
    a, w = torch.randn(16, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    offs = torch.tensor([3, 7, 7, 14], dtype=torch.int32)        # an empty group; rows 14-15 in none
    want = torch.zeros(16, 6)
    start = 0
    for i, end in enumerate(offs.tolist()):
        want[start:end] = a[start:end] @ w[i]
        start = end
    torch.testing.assert_close(mlir._grouped_mm(a, w, offs), want)
