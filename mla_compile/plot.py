"""Predicted time of each MLA form against key length (log-log), with measured points and crossovers.

    from mla_compile.plot import plot_forms, load_measured
    plot_forms(dict(B=1, S=1, H=128, r=512, dr=64, dn=128, dv=128, k=2048), "out.png", device="h200",
               measured=load_measured("bench.csv"))

Measured file (--measured): CSV with a header, or JSON (a list of objects, or {"measurements": [...]});
columns / keys:
    form     expanded | absorbed | sparse_absorbed | sparse_expanded     (required)
    T        key length                                                 (required)
    seconds  measured time of one call                                  (required)
    S, B     query length / batch (optional; rows whose S or B differ from the plot's are left out)
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import sympy
import torch

COLORS = {"expanded": "tab:blue", "absorbed": "tab:orange", "sparse_absorbed": "tab:green",
          "sparse_expanded": "tab:red"}
MEASURED_COLUMNS = ("form", "T", "seconds")


def load_measured(path: str | Path) -> list[dict]:
    """Rows {"form", "T", "seconds"[, "S", "B"]} from a CSV or JSON file (see the module docstring)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        data = json.loads(text)
        rows = data.get("measurements", data.get("records", [])) if isinstance(data, dict) else data
    else:
        rows = list(csv.DictReader(text.splitlines()))
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in MEASURED_COLUMNS if c not in row or row[c] in ("", None)]
        if missing:
            raise ValueError(f"{path}: row {i + 1} lacks {missing} (columns: form,T,seconds[,S,B])")
        rec = {"form": str(row["form"]).strip(), "T": int(float(row["T"])), "seconds": float(row["seconds"])}
        for opt in ("S", "B"):
            if row.get(opt) not in (None, ""):
                rec[opt] = int(float(row[opt]))
        out.append(rec)
    return out


def _plan(shapes: dict, device, dtype, T, flags: dict | None = None):
    from mla_compile.cost import plan

    return plan(batch=int(shapes.get("B", 1)), q_len=int(shapes.get("S", 1)), kv_len=T, heads=int(shapes["H"]),
                kv_lora_rank=int(shapes["r"]), qk_rope_head_dim=int(shapes["dr"]),
                qk_nope_head_dim=int(shapes["dn"]), v_head_dim=int(shapes["dv"]),
                topk=int(shapes["k"]) if shapes.get("k") not in (None, "None") else None,
                dtype=dtype, device=device, **(flags or {}))


def predicted_curves(shapes: dict, device="h200", dtype=torch.bfloat16, T_min: int | None = None,
                     T_max: int = 1 << 17, points: int = 64,
                     flags: dict | None = None) -> tuple[list[int], dict[str, list[float]], list]:
    """(T values, form -> predicted seconds (nan where the form is not a candidate), crossovers);
    flags: the plan's causal / mask flags, as a rewrite record holds them."""
    S = int(shapes.get("S", 1))
    lo = max(S, T_min or 1, 1)
    Ts = sorted({int(round(lo * (T_max / lo) ** (i / (points - 1)))) for i in range(points)})
    T = sympy.Symbol("T", positive=True, integer=True)
    p = _plan(shapes, device, dtype, T, flags)
    k = shapes.get("k")
    curves: dict[str, list[float]] = {f: [] for f in p.candidates}
    for t in Ts:
        times = p.times({"T": t})
        for f in p.candidates:
            ok = not f.startswith("sparse") or (k is not None and t > int(k))
            curves[f].append(times[f] if ok else math.nan)
    crossings = []
    pairs = [("absorbed", "expanded")]
    if "sparse_absorbed" in p.candidates:
        pairs.append(("sparse_absorbed", "absorbed"))
    for a, b in pairs:
        try:
            c = p.crossover(a, b, "T")
        except Exception:  # noqa: BLE001 - a plot without the marker rather than no plot
            continue
        for pt in c.points:
            if Ts[0] <= pt <= Ts[-1]:
                crossings.append((a, b, pt, c.text))
    return Ts, curves, crossings


def plot_forms(shapes: dict, out: str | Path, device="h200", dtype=torch.bfloat16, measured: list[dict] | None = None,
               title: str | None = None, T_max: int = 1 << 17, flags: dict | None = None) -> Path:
    """Draw the predicted curves (and measured points) to `out` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts, curves, crossings = predicted_curves(shapes, device, dtype, T_max=T_max, flags=flags)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for f, ys in curves.items():
        ax.plot(Ts, ys, label=f"{f} (predicted)", color=COLORS.get(f), lw=2)
    S, B = int(shapes.get("S", 1)), int(shapes.get("B", 1))
    for f in sorted({m["form"] for m in measured or []}):
        pts = sorted((m["T"], m["seconds"]) for m in measured if m["form"] == f
                     and m.get("S", S) == S and m.get("B", B) == B)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", color=COLORS.get(f, "k"), ms=6, lw=1,
                    label=f"{f} (measured)")
    for a, b, pt, _ in crossings:
        ax.axvline(pt, color="gray", ls=":", lw=1.2)
        ax.annotate(f"{a} | {b}\nT = {pt:,.0f}", (pt, 0.97), xycoords=("data", "axes fraction"), fontsize=8,
                    ha="left", va="top", rotation=0, color="dimgray", xytext=(4, 0), textcoords="offset points")
    if shapes.get("k") not in (None, "None"):
        ax.axvline(int(shapes["k"]), color="tab:green", ls="--", lw=0.8, alpha=0.5,
                   label=f"k = {int(shapes['k'])} (sparse forms only above)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("key length T (tokens)")
    ax.set_ylabel("predicted time per call (s)")
    dims = ", ".join(f"{k}={shapes[k]}" for k in ("B", "S", "H", "r", "dr", "dn", "dv", "k") if shapes.get(k) is not None)
    dev = device if isinstance(device, str) else str(device)
    ax.set_title(title or f"MLA forms on {dev} ({str(dtype).removeprefix('torch.')}): {dims}", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
