"""Every MLA form on a grid of sizes, measured, against the cost model's prediction and choice.

    python benchmarks/forms.py [--budget 200] [--smoke] [--out DIR]   # GPU: CUDA bf16, the Triton kernels
    python benchmarks/forms.py --reeval benchmarks/results/forms-NVIDIA-H200-gluon.csv   # CPU, offline

Grid: B in {1,8,32,64}, S in {1,16,128,512,2048,8192} (S <= T), T in {256,1024,4096,16384,65536},
H in {16,32,128}; r=512, dr=64, dn=dv=128; DSA points (T > k=2048) also time the sparse forms with a
random valid index set (k distinct sorted positions per query, all allowed under the causal mask).
Points run in a seeded random order until the time budget is spent (the rest are listed as not run).

Each form is the op `torch.ops.mla.<form>` (CUDA: the Triton kernel via kernel_for; sparse_expanded
has no kernel and runs its plain-torch reference). Inputs mirror what the rewritten HF graph hands
the op: S = 1 -> no mask; S > 1 -> HF's bottom-right causal float mask [1,1,S,T]; at DSA points the
dense forms also build HF's top-k selection mask from the indices inside the timed call (what
`torch.ops.mla.auto` does and what the cost model's `dsa_mask` kernel counts).

Timing: one warm call, then an eager estimate. Calls under 5 ms: a CUDA graph of n x (L2 flush + op)
replayed, minus a graph of n x flush ("gr": GPU time, L2 cold, no Python launch cost). Where capture
fails (a host sync inside the op) or calls take longer:
CUDA events around back-to-back eager calls ("ev"). The sparse ops' index range check (a host sync)
is skipped by the op itself while a graph is captured (passes/forms/common.check_indices). Skipped:
points whose inputs/intermediates exceed 60 GB, and forms predicted (h200 table) to take > 0.5 s.

Several GPUs: `--shard i/n` measures every n-th point of the shuffled list from the i-th, so n
processes on n GPUs cover the grid together; `--merge` joins their CSVs into one report (CPU).

`--reeval CSV` redoes the comparison offline from a saved CSV: with the device model saved beside it
(device-<name>.json, or the "calibrated" entry of form-efficiency-<name>.json), with the h200 table
entry, and with efficiencies fitted to it; it rewrites the fit into form-efficiency-<name>.json.

Outputs, in --out (else $OUT, else benchmarks/results/): forms-<name>.csv (one row per point and
form: sizes, measured s, method, predicted s on the calibrated device and on the h200 table),
form-efficiency-<name>.json (measured vs roofline per form, and a fitted efficiency table),
device-<name>.json (the calibrated device model), forms-<name>.md (summary). <name> is the device
label unless --name says otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
import time
import traceback

import torch

import common

R, DR, DN, DV, K = 512, 64, 128, 128, 2048
FORMS = ("expanded", "absorbed", "sparse_absorbed", "sparse_expanded")
GRID = dict(B=(1, 8, 32, 64), S=(1, 16, 128, 512, 2048, 8192), T=(256, 1024, 4096, 16384, 65536), H=(16, 32, 128))
MEM_LIMIT = 60e9
SLOW_LIMIT = 0.5


# ---------------------------------------------------------------------------------------------------
# points

def all_points():
    pts = []
    for H in GRID["H"]:
        for B in GRID["B"]:
            for T in GRID["T"]:
                for S in GRID["S"]:
                    if S > T:
                        continue
                    pts.append((B, S, T, H, None))
                    if T > K:
                        pts.append((B, S, T, H, K))
    return pts


def forms_at(k):
    return FORMS if k else FORMS[:2]


def mem_estimate(form, B, S, T, H, k, e=2):
    inputs = B * H * S * (DN + DR) * e + B * T * (R + DR) * e + B * H * S * DV * e
    mask = S * T * e if S > 1 else 0
    if k and form in ("expanded", "absorbed"):
        mask += B * S * T * (1 + e + 1)              # bool selection, masked float copy, scatter buffer
    if form == "expanded":
        extra = B * T * H * (DN + DV) * e + (B * S * T * 2 if (S > 1 or k) else 0)   # expansion + block map
    elif form == "absorbed":
        extra = 3 * B * H * S * R * 4
    elif form == "sparse_absorbed":
        extra = B * S * k * 4 + 3 * B * H * S * R * 4
    else:
        extra = B * S * k * 4 + min(B * S * k, 1 << 25) * (R + DR + H * (DN + DV)) * 4 * 2
    return inputs + mask + extra


def plan_for(B, S, T, H, k, device):
    from mla_compile.cost import plan

    return plan(batch=B, q_len=S, kv_len=T, heads=H, kv_lora_rank=R, qk_rope_head_dim=DR,
                qk_nope_head_dim=DN, v_head_dim=DV, topk=k, dtype=torch.bfloat16, device=device,
                causal=True, mask=S > 1, forms=forms_at(k))


def choose_from(p, k, T):
    """The form plan() would pick: among the candidates it allows (sparse only where T > k)."""
    c = p.costs
    ok = [f for f in c if f in ("expanded", "absorbed") or (k and T > k)]
    return min(ok, key=c.__getitem__)


# ---------------------------------------------------------------------------------------------------
# inputs and timing (GPU)

def make_inputs(B, S, T, H, k, dev, dt, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    w = rn(H * (DN + DV), R) / R ** 0.5
    wv = w.view(H, DN + DV, R)
    x = dict(q_nope=rn(B, H, S, DN), q_rope=rn(B, H, S, DR), latent=rn(B, 1, T, R), k_rope=rn(B, 1, T, DR),
             w_uk=wv[:, :DN], w_uv=wv[:, DN:], scale=1 / math.sqrt(DN + DR))
    if S > 1:       # HF's bottom-right causal mask: query s sees keys j <= T - S + s
        i = torch.arange(S, device=dev).view(S, 1)
        j = torch.arange(T, device=dev).view(1, T)
        x["mask"] = torch.zeros(S, T, device=dev, dtype=dt).masked_fill(j > T - S + i, torch.finfo(dt).min)[None, None]
    else:
        x["mask"] = None
    if k:
        span = T - S + 1                               # keys every query of the chunk may see
        stride = span // k
        base = torch.arange(k, device=dev) * stride
        off = torch.randint(0, stride, (B, S, k), device=dev, generator=g)
        x["idx"] = (base + off).to(torch.int32)
    return x


def op_call(form, x, k):
    ops = torch.ops.mla
    a = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"])
    if form in ("sparse_absorbed", "sparse_expanded"):
        op = getattr(ops, form)
        return lambda: op(*a, x["idx"], x["mask"], x["scale"], False)
    op = getattr(ops, form)
    if k:
        from mla_compile.passes.forms.sparse import mask_outside_topk

        S, T = x["q_nope"].shape[2], x["latent"].shape[2]
        return lambda: op(*a, mask_outside_topk(x["mask"], x["idx"], S, T), x["scale"], False)
    return lambda: op(*a, x["mask"], x["scale"], False)


_FLUSH = {}


def flush_buf(dev):
    if dev not in _FLUSH:
        _FLUSH[dev] = torch.empty(128 << 20, dtype=torch.int8, device=dev)
    return _FLUSH[dev]


def time_graph(fn, n, dev, reps=5):
    buf = flush_buf(dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        buf.zero_()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g1, g0 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        for _ in range(n):
            buf.zero_()
            fn()
    with torch.cuda.graph(g0):
        for _ in range(n):
            buf.zero_()
    res = []
    for g in (g1, g0):
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        res.append(statistics.median(ts))
    del g1, g0
    return max(res[0] - res[1], 1e-7) / n


def measure(fn, dev, graph=True):
    """(seconds per call, method); graph=False: the op syncs with the host, no capture attempt."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    if est > SLOW_LIMIT:
        return est, "ev1"
    if est < 5e-3 and graph:
        n = max(2, min(50, int(2e-3 / max(est, 1e-6))))
        try:
            return time_graph(fn, n, dev), "gr"
        except Exception as e:  # noqa: BLE001  (host sync inside the op: capture not possible)
            torch.cuda.synchronize()
            msg = str(e).splitlines()[0][:120]
            print(f"    capture failed ({type(e).__name__}: {msg}); events", file=sys.stderr, flush=True)
    n = max(2, min(20, int(0.03 / max(est, 1e-6))))
    return common.time_events(fn, n), "ev"


def measure_cpu(fn):
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, "cpu"


# ---------------------------------------------------------------------------------------------------
# efficiency: measured vs roofline, and a fit

def kernel_terms(form, B, S, T, H, k, dev_model, dtype=torch.bfloat16):
    """[(kernel, flops, vector, bytes, launches)] of `form` at these sizes, as the cost model counts them."""
    from mla_compile.cost import symbols as sy
    from mla_compile.cost.work import form_kernels, occupancy

    dsa = bool(k) and form in ("expanded", "absorbed") and T > k
    ks = form_kernels(form, causal=True, fused=dev_model.fused_attention, mask=S > 1,
                      selected=sy.k if (k and form.startswith("sparse") and T > k) else None, dsa_mask=dsa)
    e = torch.empty((), dtype=dtype).element_size()
    sub = {sy.B: B, sy.S: S, sy.T: T, sy.H: H, sy.r: R, sy.dr: DR, sy.dn: DN, sy.dv: DV, sy.k: k or 0, sy.e: e}
    out = []
    for kn in ks.values():
        out.append((kn.name, float(kn.flops.subs(sub)), float(kn.vector.subs(sub)), float(kn.bytes.subs(sub)),
                    kn.launches, float(occupancy(kn, dev_model.sm_count).subs(sub))))
    return out


FITTED_KERNELS = ("attention",)   # ours; the cuBLAS GEMMs (absorb, output, expand) keep the table's


def model_time(terms, form, dm, eff=None, meff=None, launch=None, only=None):
    """Predicted seconds; eff/meff (when given) replace the table's efficiencies of the kernels in
    `only` (all kernels when only is None)."""
    rate = dm.matmul_rate(torch.bfloat16)
    lo = dm.launch_overhead if launch is None else launch
    t = 0.0
    for name, fl, vec, by, n, occ in terms:
        mine = only is None or name in only
        ec = eff if eff is not None and mine else dm.eff(form, name)
        em = meff if meff is not None and mine else dm.mem_eff(form, name)
        t += max(fl / (rate * ec) + vec / dm.vector_flops, by / (dm.mem_bw * em)) / occ + n * lo
    return t


def fit_efficiency(rows, dm):
    """Per form: the compute and memory efficiency of its attention kernel (our Triton kernel; the
    cuBLAS GEMMs keep the table's figures) and one device-wide launch overhead, minimising the mean
    |log(predicted / measured)| over the points."""
    by_form = {}
    for r in rows:
        if r["measured_s"] in ("", None) or r["method"] == "skip":
            continue
        terms = kernel_terms(r["form"], int(r["B"]), int(r["S"]), int(r["T"]), int(r["H"]),
                             int(r["k"]) if r["k"] not in ("", None, "0") else None, dm)
        by_form.setdefault(r["form"], []).append((terms, float(r["measured_s"])))
    effs = [round(0.02 * 1.2 ** i, 4) for i in range(22)]   # 0.02 .. ~1.0
    effs = [e for e in effs if e <= 1.0] + [1.0]
    launches = [1e-6, 2e-6, 3e-6, 4e-6, 6e-6, 8e-6, 10e-6]
    best = None
    for lo in launches:
        total, table = 0.0, {}
        for form, pts in by_form.items():
            bf = None
            for ec in effs:
                for em in effs:
                    err = sum(abs(math.log(model_time(t, form, dm, ec, em, lo, FITTED_KERNELS) / m))
                              for t, m in pts) / len(pts)
                    if bf is None or err < bf[0]:
                        bf = (err, ec, em)
            table[form] = bf
            total += bf[0] * len(pts)
        if best is None or total < best[0]:
            best = (total, lo, table)
    _, lo, table = best
    return {"launch_overhead": lo,
            "forms": {f: {"efficiency": ec, "mem_efficiency": em, "mean_abs_log_err": round(err, 4),
                          "points": len(by_form[f])} for f, (err, ec, em) in table.items()}}


def fit_decisions(rows, dm, start, passes=3):
    """Refine a log-error fit (`start`, from fit_efficiency) for the decision it drives: coordinate
    descent over each form's attention (efficiency, mem_efficiency) and the launch overhead,
    minimising sum over points of log(time of the chosen form / time of the fastest) plus 0.1 x the
    mean |log(predicted / measured)|, so the figures stay physical while the ranking is what counts."""
    pts = {}
    for r in rows:
        if r["measured_s"] in ("", None) or r["method"] == "skip":
            continue
        k = int(r["k"]) if r["k"] not in ("", None, "0") else None
        key = (int(r["B"]), int(r["S"]), int(r["T"]), int(r["H"]), k)
        pts.setdefault(key, {})[r["form"]] = (kernel_terms(r["form"], *key, dm), float(r["measured_s"]))
    pts = {p: f for p, f in pts.items() if len(f) >= 2}
    params = {f: [v["efficiency"], v["mem_efficiency"]] for f, v in start["forms"].items()}
    launch = [start["launch_overhead"]]

    def objective():
        regret, err, n = 0.0, 0.0, 0
        for (B, S, T, H, k), forms in pts.items():
            pred = {}
            for f, (terms, meas) in forms.items():
                ec, em = params.get(f, (None, None))
                pred[f] = model_time(terms, f, dm, ec, em, launch[0], FITTED_KERNELS)
                err += abs(math.log(pred[f] / meas))
                n += 1
            ok = [f for f in pred if f in ("expanded", "absorbed") or (k and T > k)]
            chosen = min(ok, key=pred.__getitem__)
            best = min(m for _, m in forms.values())
            regret += math.log(forms[chosen][1] / best)
        return regret + 0.1 * err / max(n, 1)

    grid = [round(0.02 * 1.2 ** i, 4) for i in range(22)] + [1.0]
    best = objective()
    for _ in range(passes):
        for f in params:
            for j in (0, 1):
                for v in grid:
                    old = params[f][j]
                    params[f][j] = v
                    o = objective()
                    if o < best - 1e-12:
                        best = o
                    else:
                        params[f][j] = old
        for lo in (1e-6, 2e-6, 3e-6, 4e-6, 6e-6, 8e-6, 10e-6, 15e-6):
            old = launch[0]
            launch[0] = lo
            o = objective()
            if o < best - 1e-12:
                best = o
            else:
                launch[0] = old
    return {"launch_overhead": launch[0], "objective": round(best, 4),
            "forms": {f: {"efficiency": ec, "mem_efficiency": em, "points": start["forms"][f]["points"]}
                      for f, (ec, em) in params.items()}}


def roofline_stats(rows, dm):
    """Per form: roofline time (eff = mem_eff = 1, no launch cost) / measured, percentiles."""
    per = {}
    for r in rows:
        if r["measured_s"] in ("", None) or r["method"] == "skip":
            continue
        k = int(r["k"]) if r["k"] not in ("", None, "0") else None
        terms = kernel_terms(r["form"], int(r["B"]), int(r["S"]), int(r["T"]), int(r["H"]), k, dm)
        roof = model_time(terms, r["form"], dm, 1.0, 1.0, 0.0)
        per.setdefault(r["form"], []).append(roof / float(r["measured_s"]))
    out = {}
    for f, v in per.items():
        v = sorted(v)
        q = lambda p: v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]  # noqa: E731
        out[f] = {"points": len(v), "roofline_over_measured_p10": round(q(0.1), 4),
                  "median": round(q(0.5), 4), "p90": round(q(0.9), 4), "max": round(v[-1], 4)}
    return out


def device_with(dm, fit):
    """A copy of the device model with the fitted efficiency table (per form.kernel keys)."""
    eff, meff = dict(dm.efficiency), dict(dm.mem_efficiency)
    for form, f in fit["forms"].items():
        for kn in FITTED_KERNELS:
            eff[f"{form}.{kn}"] = f["efficiency"]
            meff[f"{form}.{kn}"] = f["mem_efficiency"]
    return dm.copy(efficiency=eff, mem_efficiency=meff, launch_overhead=fit["launch_overhead"])


# ---------------------------------------------------------------------------------------------------
# evaluation (shared by the GPU run and --reeval)

def evaluate(rows, dm, label):
    """Hit rate and worst slowdown of plan() on device model `dm` against the measurements."""
    pts = {}
    for r in rows:
        key = (int(r["B"]), int(r["S"]), int(r["T"]), int(r["H"]), int(r["k"] or 0))
        if r["measured_s"] not in ("", None) and r["method"] != "skip":
            pts.setdefault(key, {})[r["form"]] = float(r["measured_s"])
        else:
            pts.setdefault(key, {})
    res = []
    for (B, S, T, H, k), meas in sorted(pts.items()):
        if len(meas) < 2:
            continue
        p = plan_for(B, S, T, H, k or None, dm)
        chosen = choose_from(p, k or None, T)
        fastest = min(meas, key=meas.__getitem__)
        t_ch = meas.get(chosen, float("inf"))
        res.append(dict(B=B, S=S, T=T, H=H, k=k, chosen=chosen, fastest=fastest,
                        slowdown=t_ch / meas[fastest], pred=p.costs[chosen],
                        ratio=p.costs[chosen] / t_ch if t_ch < float("inf") else float("nan"),
                        meas=meas, costs=dict(p.costs)))
    n = len(res)
    hits = sum(1 for x in res if x["chosen"] == x["fastest"])
    near = sum(1 for x in res if x["slowdown"] <= 1.05)
    worst = max(res, key=lambda x: x["slowdown"]) if res else None
    return dict(label=label, points=n, hits=hits, hit_rate=hits / n if n else float("nan"),
                within5=near / n if n else float("nan"),
                worst=worst["slowdown"] if worst else float("nan"),
                worst_at=(f"B={worst['B']} S={worst['S']} T={worst['T']} H={worst['H']} k={worst['k']}: "
                          f"chose {worst['chosen']}, fastest {worst['fastest']}") if worst else "",
                geo_slowdown=math.exp(sum(math.log(x["slowdown"]) for x in res) / n) if n else float("nan"),
                rows=res)


def summary_lines(ev):
    return [f"- {ev['label']}: chosen = measured-fastest at {ev['hits']}/{ev['points']} points "
            f"({100 * ev['hit_rate']:.1f}%; within 5% of fastest: {100 * ev['within5']:.1f}%), "
            f"worst slowdown {ev['worst']:.2f}x ({ev['worst_at']}), geometric-mean slowdown {ev['geo_slowdown']:.3f}x"]


def fmt_us(s):
    return "-" if s is None or s != s else (f"{s * 1e6:.1f}" if s < 1e-2 else f"{s * 1e6:.0f}")


def point_table(ev):
    lines = ["| B | S | T | H | k | expanded | absorbed | sparse_abs | sparse_exp | predicted | measured best | "
             "pred/meas (chosen) | slowdown |", "|" + "---|" * 13]
    for x in ev["rows"]:
        m = x["meas"]
        lines.append(f"| {x['B']} | {x['S']} | {x['T']} | {x['H']} | {x['k'] or '-'} | "
                     + " | ".join(fmt_us(m.get(f)) for f in FORMS)
                     + f" | {x['chosen']} | {x['fastest']} | {x['ratio']:.2f} | {x['slowdown']:.2f} |")
    return lines


CSV_FIELDS = ["B", "S", "T", "H", "k", "r", "dr", "dn", "dv", "form", "measured_s", "method", "pred_cal_s",
              "pred_table_s", "note"]


def reeval(path, device_json=None, fit_json=None):
    """CPU: redo the comparison from a saved CSV, with the calibrated device and with the fitted table."""
    from mla_compile.cost.devices import DeviceModel, table_entry

    with open(path) as f:
        rows = list(csv.DictReader(f))
    base = os.path.splitext(os.path.basename(path))[0].removeprefix("forms-")
    dj = device_json or os.path.join(os.path.dirname(path), f"device-{base}.json")
    ej = fit_json or os.path.join(os.path.dirname(path), f"form-efficiency-{base}.json")
    if os.path.exists(dj):
        dm = DeviceModel.from_dict(json.load(open(dj)))
    elif os.path.exists(ej) and "calibrated" in json.load(open(ej)):
        dm = DeviceModel.from_dict(json.load(open(ej))["calibrated"])
    else:
        dm = table_entry("h200")
    lines = [f"# Cost model re-evaluated offline from {os.path.basename(path)}", ""]
    before = evaluate(rows, dm, f"device model as used ({dm.name}, {dm.source[:80]})")
    table = evaluate(rows, table_entry("h200"), "h200 table entry as is")
    lines += summary_lines(before) + summary_lines(table)
    fit = fit_efficiency(rows, dm)
    after = evaluate(rows, device_with(dm, fit), "with the fitted efficiencies")
    lines += summary_lines(after)
    lines += ["", "fitted: " + json.dumps(fit)]
    if os.path.exists(ej):
        saved = json.load(open(ej)).get("fit")
        if saved and "forms" not in saved:     # a GPU run's file holds two fits: {"log_error", "decisions"}
            saved = saved.get("log_error")
        if saved:
            ev = evaluate(rows, device_with(dm, saved), "with the efficiencies in " + os.path.basename(ej))
            lines += summary_lines(ev)
    tab = device_with(table_entry("h200"), fit)
    ev_tab_fit = evaluate(rows, tab, "h200 table entry + fitted efficiencies (launch overhead fitted too)")
    lines += summary_lines(ev_tab_fit)
    if os.path.exists(ej):
        d = json.load(open(ej))
        d["fit"] = fit
        d["roofline_over_measured"] = roofline_stats(rows, dm)
        d["fit_evaluation"] = {e["label"]: {k: e[k] for k in ("points", "hits", "hit_rate", "within5", "worst",
                                                                "worst_at", "geo_slowdown")}
                               for e in (before, table, after, ev_tab_fit)}
        with open(ej, "w") as f:
            json.dump(d, f, indent=1)
        lines += ["", "## Per point, h200 table + fitted efficiencies", ""] + point_table(ev_tab_fit)
    print("\n".join(lines))
    return before, after, fit


# ---------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=200.0, help="seconds of measuring (GPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny grid, any device (CPU: reference ops)")
    ap.add_argument("--reeval", metavar="CSV", help="offline: redo the comparison from a saved CSV")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-first", action="store_true", help="do not put the target points first")
    ap.add_argument("--no-fit", action="store_true", help="skip the efficiency fit (do it offline with --reeval)")
    ap.add_argument("--shard", default="0/1", help="i/n: measure every n-th point from the i-th (one GPU each)")
    ap.add_argument("--merge", nargs="+", metavar="CSV", help="offline: join shard CSVs into one report")
    ap.add_argument("--name", help="report name (default: the device name, or the merged shards' common name)")
    ap.add_argument("--out", help="result folder (default: $OUT, else benchmarks/results)")
    args = ap.parse_args()
    if args.reeval:
        reeval(args.reeval)
        return
    if args.merge:
        merge(args)
        return
    t_start = time.time()
    import mla_compile.passes.forms  # noqa: F401  (registers torch.ops.mla.*)
    from mla_compile.cost import calibrate
    from mla_compile.cost.devices import table_entry

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16
    if cuda:
        dm = calibrate("cuda")
        cal_src = "calibrate() on this GPU"
    else:
        dm = calibrate("cpu")
        cal_src = "calibrate() on this CPU"
    table_key = "h200" if not cuda else (os.environ.get("MLA_TABLE") or
                                         ("h100" if "H100" in torch.cuda.get_device_name() else "h200"))
    tm = table_entry(table_key if cuda else "cpu")
    name = args.name or (common.device_label(dev) + ("-smoke" if args.smoke else "")
                         + (f"-seed{args.seed}" if args.seed else ""))
    shard, nshards = (int(v) for v in args.shard.split("/"))
    if nshards > 1:
        name += f"-shard{shard}of{nshards}"
    out_dir = common.out_dir(args.out)
    csv_path = os.path.join(out_dir, f"forms-{name}.csv")
    with open(os.path.join(out_dir, f"device-{name}.json"), "w") as f:
        f.write(dm.to_json())

    if args.smoke:
        pts = [(1, 1, 256, 16, None), (2, 16, 256, 16, None), (1, 1, 4096, 16, K), (1, 16, 4096, 16, K),
               (2, 128, 1024, 16, None)]
        if cuda:
            pts = [(1, 1, 4096, 128, None), (8, 1, 4096, 128, K), (1, 512, 1024, 32, None), (1, 16, 4096, 16, K)]
    else:
        pts = all_points()
        random.Random(args.seed).shuffle(pts)
        # the target points first, so a short budget still covers decode and prefill at H=128
        first = [(8, 1, 4096, 128, None), (1, 1, 4096, 128, None), (32, 1, 16384, 128, None),
                 (1, 2048, 4096, 128, None), (1, 8192, 16384, 128, None), (8, 1, 65536, 128, K),
                 (1, 512, 1024, 128, None), (8, 16, 4096, 128, None), (8, 128, 16384, 16, None)]
        if not args.no_first:
            pts = first + [p for p in pts if p not in first]
    pts = pts[shard::nshards]
    rows, skipped, not_run = [], [], []
    fcsv = open(csv_path, "w", newline="")
    w = csv.DictWriter(fcsv, CSV_FIELDS)
    w.writeheader()
    done = 0
    for i, (B, S, T, H, k) in enumerate(pts):
        if time.time() - t_start > args.budget:
            not_run = pts[i:]
            break
        p_cal = plan_for(B, S, T, H, k, dm)
        p_tab = plan_for(B, S, T, H, k, tm)
        fits = [f for f in forms_at(k) if mem_estimate(f, B, S, T, H, k) <= MEM_LIMIT]
        if not fits:
            skipped.append(((B, S, T, H, k), "memory"))
            continue
        try:
            x = make_inputs(B, S, T, H, k, dev, dt)
        except torch.OutOfMemoryError:
            skipped.append(((B, S, T, H, k), "inputs OOM"))
            torch.cuda.empty_cache()
            continue
        line = []
        for form in forms_at(k):
            row = dict(B=B, S=S, T=T, H=H, k=k or 0, r=R, dr=DR, dn=DN, dv=DV, form=form, measured_s="",
                       method="skip", pred_cal_s=p_cal.costs[form], pred_table_s=p_tab.costs[form], note="")
            if form not in fits:
                row["note"] = f"memory > {MEM_LIMIT / 1e9:.0f} GB"
            elif p_tab.costs[form] > SLOW_LIMIT and not args.smoke:
                row["note"] = f"predicted {p_tab.costs[form]:.2f} s > {SLOW_LIMIT} s"
            else:
                try:
                    fn = op_call(form, x, k)
                    graph = form != "sparse_expanded"      # its plain-torch reference may sync
                    t, how = measure(fn, dev, graph) if cuda else measure_cpu(fn)
                    row["measured_s"], row["method"] = t, how
                except torch.OutOfMemoryError:
                    row["note"] = "OOM"
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001
                    row["note"] = f"{type(e).__name__}: {str(e)[:100]}"
                    traceback.print_exc()
            rows.append(row)
            w.writerow(row)
            line.append(f"{form}={fmt_us(row['measured_s'] or None) if row['measured_s'] != '' else row['note'] or '-'}"
                        f"/{fmt_us(row['pred_cal_s'])}")
        fcsv.flush()
        done += 1
        print(f"[{time.time() - t_start:5.0f}s] B={B} S={S} T={T} H={H} k={k}: " + "  ".join(line)
              + f"  -> model {choose_from(p_cal, k, T)}", flush=True)
        del x
        if cuda:
            torch.cuda.empty_cache()
    fcsv.close()
    meta = dict(device=dev, budget=args.budget, done=done, skipped=skipped,
                not_run=len(not_run), total=len(pts), cal_src=cal_src)
    write_report(rows, dm, tm, name, meta, out_dir, fit=not args.no_fit)


def write_report(rows, dm, tm, name, meta, out_dir, fit=True):
    """The markdown summary, the efficiency JSON (measured vs roofline, optional fit) for `rows`."""
    ev_cal = evaluate(rows, dm, f"calibrated device model ({meta['cal_src']}), default efficiency table")
    ev_tab = evaluate(rows, tm, f"'{tm.name}' table entry (what the backend uses without calibrate()), "
                                f"its efficiency table")
    roof = roofline_stats(rows, dm)
    fit = fit_efficiency(rows, dm) if fit else None
    evs = [ev_tab, ev_cal]
    if fit:
        evs.append(evaluate(rows, device_with(dm, fit), "calibrated device model + efficiencies fitted here "
                                                        "(log error)"))
        fit = {"log_error": fit, "decisions": fit_decisions(rows, dm, fit)}
        evs.append(evaluate(rows, device_with(dm, fit["decisions"]), "calibrated device model + efficiencies "
                                                                     "fitted here (decisions)"))
    eff_json = {"device": name, "date": common.utc_now(),
                "torch": torch.__version__, "calibrated": dm.to_dict(),
                "roofline_over_measured": roof, "fit": fit,
                "note": "efficiency = fraction of the calibrated matmul rate, mem_efficiency = fraction of the "
                        "calibrated copy bandwidth, fitted per form over all measured points (one value for all "
                        "kernels of the form), launch_overhead device-wide; roofline_over_measured: time at "
                        "efficiency 1 and no launch cost / measured time"}
    with open(os.path.join(out_dir, f"form-efficiency-{name}.json"), "w") as f:
        json.dump(eff_json, f, indent=1)
    lines = common.header(f"MLA forms vs the cost model: {name}", meta.get("device"), notes=[
        *meta.get("notes", ()),
        f"calibrated: {dm.source}",
        f"points measured: {meta['done']}; skipped (memory): {len(meta['skipped'])}; not run (time budget "
        f"{meta['budget']:.0f} s): {meta['not_run']} of {meta['total']}",
        "times in microseconds; 'gr' = CUDA-graph GPU time (L2 flushed), 'ev' = CUDA events around "
        "eager calls (capture impossible: host sync in the op, or call > 5 ms)"])
    for ev in evs:
        lines += summary_lines(ev)
    lines += ["", "Roofline time / measured time per form (eff = 1): " + json.dumps(roof), "",
              "Fitted: " + json.dumps(fit), "", f"## Per point ('{tm.name}' table entry)", ""]
    lines += point_table(ev_tab)
    methods = {}
    for r in rows:
        methods[(r["form"], r["method"])] = methods.get((r["form"], r["method"]), 0) + 1
    lines += ["", "timing methods (form, method): count: " + ", ".join(f"{a}/{b}: {c}" for (a, b), c in
                                                                         sorted(methods.items()))]
    skips = [r for r in rows if r["note"]]
    if skips or meta["skipped"]:
        lines += ["", "Skipped forms: " + "; ".join(f"B={r['B']} S={r['S']} T={r['T']} H={r['H']} k={r['k']} "
                                                     f"{r['form']}: {r['note']}" for r in skips[:60])
                  + (f" (+{len(skips) - 60} more)" if len(skips) > 60 else "")]
        if meta["skipped"]:
            lines += ["Skipped points: " + "; ".join(f"{p}: {why}" for p, why in meta["skipped"])]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(out_dir, f"forms-{name}.md"), "w") as f:
        f.write(text)


def merge(args):
    """Join shard CSVs (same device) into forms-<name>.csv and its report."""
    from mla_compile.cost.devices import DeviceModel, table_entry

    rows, names = [], []
    for path in args.merge:
        with open(path) as f:
            rows += list(csv.DictReader(f))
        names.append(os.path.splitext(os.path.basename(path))[0].removeprefix("forms-"))
    name = args.name or names[0].split("-shard")[0]
    dj = os.path.join(os.path.dirname(args.merge[0]), f"device-{names[0]}.json")
    dm = DeviceModel.from_dict(json.load(open(dj)))
    tm = table_entry(os.environ.get("MLA_TABLE") or ("h100" if "H100" in name else "h200"))
    out_dir = common.out_dir(args.out)
    with open(os.path.join(out_dir, f"forms-{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    pts = {(r["B"], r["S"], r["T"], r["H"], r["k"]) for r in rows}
    meta = dict(device=name.split("-shard")[0], budget=float("nan"), done=len(pts), skipped=[],
                not_run=0, total=len(pts), cal_src="calibrate() on the GPU of the first shard",
                notes=["measured by the shards " + ", ".join(os.path.basename(p) for p in args.merge)
                       + ", joined on this machine with --merge"])
    write_report(rows, dm, tm, name, meta, out_dir, fit=not args.no_fit)


if __name__ == "__main__":
    main()
