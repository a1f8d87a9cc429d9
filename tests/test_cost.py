"""The cost model: decisions physics settles, monotonicity, crossovers vs numeric evaluation, the
runtime chooser, device lookup and calibration (CPU only, fast)."""

from __future__ import annotations

import importlib
import json
import math
import random

import pytest
import sympy
import torch
from hypothesis import given, settings, strategies as st

from mla_compile.cost import DEVICES, DeviceModel, Plan, calibrate, load_device, plan, runtime_chooser
from mla_compile.cost.devices import table_key_for_gpu
from mla_compile.cost.work import DENSE_FORMS, FORMS, SPARSE_FORMS, form_steps, totals
from mla_compile.cost import symbols as sy

calibrate_mod = importlib.import_module("mla_compile.cost.calibrate")   # the module, not the function

V3 = dict(heads=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


# -- the counts ----------------------------------------------------------------------------------

def test_counts_match_the_brief():
    steps = form_steps("expanded", causal=False)
    assert sympy.expand(steps["expand"].flops - 2 * sy.B * sy.T * sy.r * sy.H * (sy.dn + sy.dv)) == 0
    a = form_steps("absorbed", causal=False)
    B, H, S, T, r, dr, dn, dv, e = sy.B, sy.H, sy.S, sy.T, sy.r, sy.dr, sy.dn, sy.dv, sy.e
    assert sympy.expand(a["absorb"].flops - 2 * B * H * S * dn * r) == 0
    assert sympy.expand(a["score"].flops - 2 * B * H * S * T * (r + dr)) == 0
    assert sympy.expand(a["value"].flops - 2 * B * H * S * T * r) == 0
    assert sympy.expand(a["output"].flops - 2 * B * H * S * r * dv) == 0
    # the latent is read once per batch row, never once per head
    lat = a["score"].bytes.coeff(T)
    assert sympy.expand(lat - B * (r + dr) * e) == 0
    # causal, bottom-right: query i of S sees T-S+i+1 keys
    c = form_steps("absorbed", causal=True)["score"].flops
    live = sum(10 - 4 + i + 1 for i in range(4))
    assert c.subs({B: 1, H: 1, S: 4, T: 10, r: 1, dr: 0}) == 2 * live
    # sparse: T replaced by min(k, T), plus gather and int32 index bytes, never the whole latent
    sp = form_steps("sparse_absorbed")
    assert sp["score"].flops.has(sympy.Min(sy.k, T))
    # (a sequence's queries share its latent rows through L2: at most T rows per sequence from DRAM)
    assert sympy.expand(sp["gather"].bytes.subs(sympy.Min(sy.k, T), sy.k)
                        - (B * sympy.Min(S * sy.k, T) * (r + dr) * e + B * S * sy.k * 4)) == 0
    for f in FORMS:
        t = totals(f)
        assert set(t) == {"flops", "vector", "bytes", "launches"} and t["launches"] >= 2


# -- decisions physics settles -------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 8, 64])
def test_long_context_decode_is_absorbed(batch):
    p = plan(batch=batch, q_len=1, kv_len=32768, device="h200", dtype=torch.bfloat16, **V3)
    assert p.form == "absorbed"
    assert p.costs["expanded"] > 10 * p.costs["absorbed"]


def test_prefill_is_expanded():
    p = plan(batch=1, q_len=4096, kv_len=4096, device="h200", **V3)
    assert p.form == "expanded"
    assert set(p.costs) == set(DENSE_FORMS)


def test_dsa_decode_long_context_is_sparse():
    p = plan(batch=1, q_len=1, kv_len=65536, topk=2048, device="h200", **V3)
    assert p.form in SPARSE_FORMS
    assert set(p.costs) == set(FORMS)


@pytest.mark.parametrize("kv_len", [100, 2047, 2048])
def test_dsa_with_short_cache_is_dense(kv_len):
    p = plan(batch=4, q_len=1, kv_len=kv_len, topk=2048, device="h200", **V3)
    assert p.form in DENSE_FORMS
    assert set(p.costs) == set(DENSE_FORMS)
    assert "sparse" in p.excluded


@pytest.mark.parametrize("device", sorted(DEVICES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_device_and_dtype_decides(device, dtype):
    p = plan(batch=8, q_len=1, kv_len=32768, device=device, dtype=dtype, **V3)
    assert p.form == "absorbed"
    assert all(v > 0 and math.isfinite(v) for v in p.costs.values())


def test_monotone_in_T_and_S():
    Ts = [64, 256, 1024, 2048, 4096, 8192, 32768, 131072]
    Ss = [1, 2, 16, 64, 128, 512, 1024, 4096, 16384]
    for dev in ("h200", "cpu"):
        for B in (1, 8):
            for S in Ss:
                prev = None
                for T in [t for t in Ts if t >= S]:
                    c = plan(batch=B, q_len=S, kv_len=T, topk=2048, forms=FORMS, device=dev, **V3).costs
                    if prev:
                        assert all(c[f] >= prev[f] * (1 - 1e-12) for f in FORMS), (dev, B, S, T)
                    prev = c
            for T in Ts:
                prev = None
                for S in [s for s in Ss if s <= T]:
                    c = plan(batch=B, q_len=S, kv_len=T, topk=2048, forms=FORMS, device=dev, **V3).costs
                    if prev:
                        assert all(c[f] >= prev[f] * (1 - 1e-12) for f in FORMS), (dev, B, S, T)
                    prev = c


# -- crossovers ----------------------------------------------------------------------------------

DIMS = st.fixed_dictionaries({
    "heads": st.sampled_from([16, 32, 64, 128]),
    "kv_lora_rank": st.sampled_from([256, 512]),
    "qk_rope_head_dim": st.sampled_from([0, 32, 64]),
    "qk_nope_head_dim": st.sampled_from([64, 128]),
    "v_head_dim": st.sampled_from([64, 128]),
})


def _check_flips(p: Plan, c, symbol: str, lo: float, hi: float):
    """The chosen form flips at every boundary exactly as the crossover says."""
    a, b = c.form_a, c.form_b
    for i, x in enumerate(c.points):
        assert math.isclose(float(c.boundaries[i]), x, rel_tol=1e-6, abs_tol=1e-6)
        for v, want in ((x * (1 - 1e-5), c.winners[i]), (x * (1 + 1e-5), c.winners[i + 1])):
            if lo <= v <= hi:
                t = p.times({symbol: v})
                assert (a if t[a] < t[b] else b) == want
        assert c.winners[i] != c.winners[i + 1]
    # between boundaries the winner is constant and as stated
    probes = [lo, hi] + [x * 0.9 for x in c.points] + [x * 1.1 for x in c.points]
    for v in probes:
        if lo <= v <= hi:
            t = p.times({symbol: v})
            got = a if t[a] < t[b] else b
            if all(abs(v - x) > 1e-6 * x for x in c.points) and abs(t[a] - t[b]) > 1e-12 * t[a]:
                assert got == c.winner_at(v), (v, c.text)


@SETTINGS
@given(dims=DIMS, batch=st.integers(1, 64), kv_len=st.integers(256, 131072),
       device=st.sampled_from(["h200", "h100", "a100", "b200", "cpu"]))
def test_s_crossover_matches_numeric(dims, batch, kv_len, device):
    p = plan(batch=batch, q_len=1, kv_len=kv_len, device=device, **dims)
    c = p.crossover("absorbed", "expanded", "S")
    _check_flips(p, c, "S", 1.0, float(kv_len))
    # integer sizes either side of each boundary, through plan() itself
    for i, x in enumerate(c.points):
        below, above = math.floor(x * (1 - 1e-9)), math.ceil(x * (1 + 1e-9))
        if below >= 1 and below != x:
            q = plan(batch=batch, q_len=below, kv_len=kv_len, device=device, **dims)
            assert q.form == c.winners[i]
        if above <= kv_len and above != x:
            q = plan(batch=batch, q_len=above, kv_len=kv_len, device=device, **dims)
            assert q.form == c.winners[i + 1]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(batch=st.integers(1, 64), q_len=st.integers(1, 64), topk=st.sampled_from([512, 1024, 2048]))
def test_t_crossover_sparse_vs_absorbed(batch, q_len, topk):
    p = plan(batch=batch, q_len=q_len, kv_len=topk + 1, topk=topk, device="h200", **V3)
    c = p.crossover("sparse_absorbed", "absorbed", "T")
    _check_flips(p, c, "T", float(max(q_len, topk + 1)), float(1 << 22))


def test_symbolic_crossover_agrees_with_numeric():
    B, T = sympy.symbols("B T", positive=True, integer=True)
    rng = random.Random(0)
    for _ in range(10):
        b, t = rng.randint(1, 64), rng.randint(512, 131072)
        sym = plan(batch=B, q_len=1, kv_len=T, hints={"B": b, "T": t}, **V3)
        c = sym.crossover("absorbed", "expanded", "S")
        assert c.boundary.free_symbols <= {B, T}
        num = plan(batch=b, q_len=1, kv_len=t, **V3).crossover("absorbed", "expanded", "S")
        assert math.isclose(float(c.boundary.subs({B: b, T: t})), num.points[0], rel_tol=1e-6)
        assert "absorbed while S <" in c.text


def test_crossover_is_a_readable_pair():
    boundary, text = plan(batch=8, q_len=1, kv_len=4096, **V3).crossover("absorbed", "expanded", "S")
    assert 16 < float(boundary) < 1024
    assert text.startswith("absorbed while S <") and "expanded while S >" in text


# -- runtime chooser -----------------------------------------------------------------------------

def test_runtime_chooser_agrees_with_plan():
    B, S, T = sympy.symbols("B S T", positive=True, integer=True)
    choose, text = runtime_chooser(batch=B, q_len=S, kv_len=T, device="h200", **V3)
    choose_dsa, text_dsa = runtime_chooser(batch=B, q_len=S, kv_len=T, topk=2048, device="h200", **V3)
    assert "absorbed while S <" in text and "sparse" in text_dsa
    rng = random.Random(1)
    for _ in range(200):
        t = rng.choice([rng.randint(1, 4096), rng.randint(1, 200000)])
        s = rng.choice([1, 2, rng.randint(1, t)])
        s = min(s, t)
        b = rng.randint(1, 64)
        assert choose({"S": s, "T": t, "B": b}) == plan(batch=b, q_len=s, kv_len=t, **V3).form
        assert choose_dsa({"q_len": s, "kv_len": t, "batch": b}) == \
            plan(batch=b, q_len=s, kv_len=t, topk=2048, **V3).form
    assert choose({"S": 1, "T": 5000, "B": 8}) == "absorbed"
    assert choose_dsa({"S": 1, "T": 65536, "B": 8}) in SPARSE_FORMS
    assert choose_dsa({"S": 1, "T": 2048, "B": 8}) in DENSE_FORMS


def test_runtime_chooser_on_dynamo_style_symbols():
    s0 = sympy.Symbol("s0")
    choose, text = runtime_chooser(batch=2, q_len=s0, kv_len=s0 + 4096, **V3)
    assert "along s0" in text
    for v in (1, 7, 100, 300, 5000):
        assert choose({"s0": v}) == plan(batch=2, q_len=v, kv_len=v + 4096, **V3).form
    with pytest.raises(KeyError):
        choose({"T": 3})


def test_symbolic_plan():
    S, T = sympy.symbols("S T", positive=True, integer=True)
    p = plan(batch=8, q_len=S, kv_len=T, **V3)
    assert p.form is None and p.costs == {}
    assert p.expressions["absorbed"].free_symbols == {S, T}
    assert p.choose({"S": 1, "T": 32768}) == "absorbed"
    assert "along S" in p.explain()


# -- explain -------------------------------------------------------------------------------------

def test_explain():
    p = plan(batch=8, q_len=1, kv_len=4096, **V3)
    text = p.explain()
    for word in ("absorbed", "expanded", "compute", "memory", "wins", "h200", "<- chosen"):
        assert word in text
    assert p.device["matmul_flops"] == pytest.approx(687e12)
    assert p.device["mem_bw"] == pytest.approx(4.27e12)
    assert isinstance(p.expressions["absorbed"], sympy.Expr)


def test_fp32_rate_follows_matmul_precision():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        slow = plan(batch=8, q_len=1, kv_len=4096, dtype=torch.float32, **V3)
        torch.set_float32_matmul_precision("high")
        fast = plan(batch=8, q_len=1, kv_len=4096, dtype=torch.float32, **V3)
    finally:
        torch.set_float32_matmul_precision(old)
    assert fast.device["matmul_flops"] > 5 * slow.device["matmul_flops"]
    assert fast.costs["expanded"] < slow.costs["expanded"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan(batch=1, q_len=10, kv_len=5, **V3)
    with pytest.raises(ValueError):
        plan(batch=1, q_len=1, kv_len=5, forms=("nonsense",), **V3)
    with pytest.raises(KeyError):
        plan(batch=1, q_len=1, kv_len=5, device="tpu-v9", **V3)


# -- devices -------------------------------------------------------------------------------------

def test_table_lookup_by_name():
    assert table_key_for_gpu("NVIDIA H100 80GB HBM3") == "h100"
    assert table_key_for_gpu("NVIDIA H200") == "h200"
    assert table_key_for_gpu("NVIDIA A100-SXM4-80GB") == "a100"
    assert table_key_for_gpu("NVIDIA L40S") == "l40s"
    assert table_key_for_gpu("NVIDIA B200") == "b200"
    assert table_key_for_gpu("NVIDIA GeForce RTX 4090") is None
    for name in ("h100", "h200", "a100", "l40s", "b200", "cpu"):
        assert load_device(name).name == name
    assert DEVICES["h200"].matmul_flops["bf16"] == pytest.approx(687e12)


def test_lookup_by_torch_device(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_COMPILE_CACHE_DIR", str(tmp_path))
    m = load_device(torch.device("cpu"))
    assert m.name == "cpu" and not m.measured and not m.fused_attention
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    assert load_device(torch.device("cuda", 0)).name == "h200"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Mystery GPU 9000")
    with pytest.warns(UserWarning):
        m = load_device(torch.device("cuda", 0))
    assert m.warning and "h100" in m.warning
    assert m.matmul_flops == DEVICES["h100"].matmul_flops


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLA_COMPILE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibrate_mod.cache_dir() == tmp_path / "xdg" / "mla_compile"
    monkeypatch.setenv("MLA_COMPILE_CACHE_DIR", str(tmp_path / "over"))
    assert calibrate_mod.cache_dir() == tmp_path / "over"


def test_calibrate_cpu_writes_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_COMPILE_CACHE_DIR", str(tmp_path))
    m = calibrate(torch.device("cpu"))
    path = tmp_path / "device-cpu.json"
    assert path.is_file()
    assert m.measured and m.matmul_flops["fp32"] > 1e8 and m.mem_bw > 1e8 and m.launch_overhead > 0
    assert m.sm_count == torch.get_num_threads()          # the CPU's, not a GPU table's 132
    back = load_device(torch.device("cpu"))
    assert back == m
    assert DeviceModel.from_dict(json.loads(path.read_text())) == m
    p = plan(batch=1, q_len=1, kv_len=8192, device=torch.device("cpu"), **V3)
    assert p.device["measured"] and p.form == "absorbed"
    # a table name keeps the table's figures
    assert not plan(batch=1, q_len=1, kv_len=8192, device="cpu", **V3).device["measured"]


def test_gpu_cache_keeps_its_rates_but_not_stale_kernel_figures(tmp_path, monkeypatch):
    """A calibration written by an older version (other efficiencies, an eager launch cost) gives its
    measured rates; the kernels' efficiencies and fixed cost come from this version's table."""
    monkeypatch.setenv("MLA_COMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    old = DEVICES["h200"].copy(matmul_flops={**DEVICES["h200"].matmul_flops, "bf16": 777e12}, mem_bw=4.1e12,
                               efficiency={"default": 0.7}, mem_efficiency={"default": 0.85},
                               launch_overhead=89e-6, measured=True)
    (tmp_path / "device-h200.json").write_text(old.to_json())
    m = load_device(torch.device("cuda", 0))
    assert m.measured and m.matmul_flops["bf16"] == 777e12 and m.mem_bw == 4.1e12
    assert m.efficiency == DEVICES["h200"].efficiency and m.mem_efficiency == DEVICES["h200"].mem_efficiency
    assert m.launch_overhead == DEVICES["h200"].launch_overhead


def test_symbolic_plan_choose_matches_numeric_with_topk():
    T = sympy.Symbol("T", positive=True, integer=True)
    p = plan(batch=4, q_len=1, kv_len=T, topk=2048, **V3)
    for t in (16, 1000, 2048, 2049, 2300, 2500, 10000, 100000):
        assert p.choose({"T": t}) == plan(batch=4, q_len=1, kv_len=t, topk=2048, **V3).form


def test_plan_times_with_dynamo_style_symbols():
    s0 = sympy.Symbol("s0")
    p = plan(batch=2, q_len=s0, kv_len=s0 + 4096, **V3)
    for v in (1, 300, 5000):
        want = plan(batch=2, q_len=v, kv_len=v + 4096, **V3)
        assert p.times({"s0": v}) == pytest.approx(want.costs)
        assert p.times({"q_len": v}) == pytest.approx(want.costs)
        assert p.choose({"s0": v}) == want.form


def test_hopper_decode_efficiency_where_the_gluon_kernel_runs():
    """On the sm_90 entries the absorbed attention at one query (r=512, dr=64, a half dtype) is costed
    with the Hopper Gluon kernels' fitted efficiencies (the heads-major one above 32 heads, the
    keys-major one at <= 32), everywhere else with the Triton kernel's; with S symbolic the run-time chooser takes the Hopper figure where S is 1."""
    from mla_compile.cost.devices import (DEFAULT_EFFICIENCY, HOPPER_DECODE_EFFICIENCY, KEYS_MAJOR_DECODE_EFFICIENCY,
                                          KEYS_MAJOR_DECODE_MEM_EFFICIENCY)
    from mla_compile.kernels import sm90

    if not sm90.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon: the Hopper kernel never runs")
    triton_eff = DEFAULT_EFFICIENCY["absorbed.attention"]

    def eff(**kw):
        args = dict(batch=8, q_len=1, kv_len=4096, device="h200", **V3)
        args.update(kw)
        return plan(**args).device["efficiency"]["absorbed.attention"]

    assert eff() == HOPPER_DECODE_EFFICIENCY != triton_eff
    assert eff(device="h100") == HOPPER_DECODE_EFFICIENCY
    assert eff(dtype=torch.float16) == HOPPER_DECODE_EFFICIENCY
    assert eff(q_len=2) == triton_eff
    assert eff(dtype=torch.float32) == triton_eff
    assert eff(device="a100") == triton_eff
    assert eff(device="b200") == triton_eff
    # <= 32 heads: the keys-major kernel's figures, compute and memory
    km = plan(batch=8, q_len=1, kv_len=4096, heads=32, device="h200", **{k: v for k, v in V3.items() if k != "heads"})
    assert km.device["efficiency"]["absorbed.attention"] == KEYS_MAJOR_DECODE_EFFICIENCY
    assert km.device["mem_efficiency"]["absorbed.attention"] == KEYS_MAJOR_DECODE_MEM_EFFICIENCY
    assert eff(heads=16) == KEYS_MAJOR_DECODE_EFFICIENCY and eff(heads=33) == HOPPER_DECODE_EFFICIENCY
    assert eff(heads=32, q_len=2) == triton_eff and eff(heads=32, device="a100") == triton_eff
    # the same rule as the op's: the cost model costs the kernel registry.absorbed_core names
    from mla_compile.kernels.registry import absorbed_core

    for heads, figure in ((128, HOPPER_DECODE_EFFICIENCY), (32, KEYS_MAJOR_DECODE_EFFICIENCY)):
        core = absorbed_core(torch.bfloat16, heads, 1, 512, 64, False, sm90=True)
        assert {"seesaw": HOPPER_DECODE_EFFICIENCY, "keys_major": KEYS_MAJOR_DECODE_EFFICIENCY}[core] == figure
        assert eff(heads=heads) == figure
    assert absorbed_core(torch.bfloat16, 128, 1, 512, 64, False, sm90=False) == "triton"
    # the faster kernel shows in the prediction: the decode step's attention kernel costs less
    triton_only = DEVICES["h200"].copy(efficiency=dict(DEFAULT_EFFICIENCY))
    fast = plan(batch=8, q_len=1, kv_len=16384, device="h200", **V3).costs["absorbed"]
    slow = plan(batch=8, q_len=1, kv_len=16384, device=triton_only, **V3).costs["absorbed"]
    assert fast < slow
    # a plan at S = 1 asked about S = 2 (times, crossover along S) takes the Triton kernel's figures there
    for heads in (128, 16):
        dims = {**V3, "heads": heads}
        one = plan(batch=8, q_len=1, kv_len=16384, device="h200", **dims)
        two = plan(batch=8, q_len=2, kv_len=16384, device="h200", **dims)
        assert one.times({"S": 2}) == pytest.approx(two.costs) and one.costs["absorbed"] < two.costs["absorbed"]
    S = sympy.Symbol("S", positive=True, integer=True)
    p = plan(batch=8, q_len=S, kv_len=16384, device="h200", **V3)
    assert p.times({"S": 1})["absorbed"] == pytest.approx(plan(batch=8, q_len=1, kv_len=16384, device="h200",
                                                                **V3).costs["absorbed"])
    assert p.times({"S": 2})["absorbed"] == pytest.approx(plan(batch=8, q_len=2, kv_len=16384, device="h200",
                                                                **V3).costs["absorbed"])


# -- one shared key/value head against the MLA forms ------------------------------------------------

@pytest.mark.parametrize("device", ["h100", "h200", "a100", "b200"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,H,S,T,D", [(8, 64, 4, 32768, 512), (2, 16, 64, 64, 128), (3, 7, 5, 77, 48)])
def test_latent_mqa_costs_what_the_plan_costs_the_absorbed_attention_kernel(device, causal, B, H, S, T, D):
    """Latent MQA runs the absorbed form's attention kernel with the query given, the shared head as
    the latent (r = D) and no RoPE part (dr = 0), so without a mask shared_kv.py and plan.py must price
    that kernel's roofline part, max(compute, memory), the same, and both count two launches (the split
    kernel and its merge)."""
    from mla_compile.cost.plan import resolve_device
    from mla_compile.cost.shared_kv import shared_kv_costs

    dev = resolve_device(device)
    p = plan(batch=B, q_len=S, kv_len=T, heads=H, kv_lora_rank=D, qk_rope_head_dim=0, qk_nope_head_dim=D,
             v_head_dim=D, device=dev, causal=causal)
    kernels = {name: (compute, memory, launch) for name, compute, memory, launch, *_ in
               p._kernels("absorbed", p._sizes())}
    compute, memory, launch = kernels["attention"]
    latent = shared_kv_costs(dict(B=B, H=H, S=S, T=T, D=D), dev, torch.bfloat16, mask=False,
                             causal=causal)["latent_mqa"][1]
    assert launch == pytest.approx(2 * dev.launch_overhead, rel=1e-12)
    assert latent == pytest.approx(max(compute, memory) + launch, rel=1e-12)
