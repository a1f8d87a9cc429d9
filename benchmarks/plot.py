"""Plots from the benchmark CSVs (runs on a CPU; matplotlib only).

    python benchmarks/plot.py [--device NVIDIA-H200]

benchmarks/results/generate-<device>.csv -> decode-latency-<device>.png: decode step latency (ms) against
context length, log-log, one panel per (model, batch), one line per system.
benchmarks/results/forms-<device>.csv -> forms-breakdown-<device>.png: measured time of every form at each
grid point (log scale; the cost model's choice outlined), and forms-pred-vs-meas-<device>.png: predicted
(h200 table) against measured time per form.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
COLORS = {"HF eager (sdpa)": "tab:red", "Inductor": "tab:orange", "mla": "tab:blue",
          "expanded": "tab:red", "absorbed": "tab:blue", "sparse_absorbed": "tab:green", "sparse_expanded": "tab:purple"}


def _run_line(csv_path):
    """'\n<device, date, command>' from the markdown report written beside the CSV, if there is one."""
    md = csv_path[:-4] + ".md"
    if not os.path.exists(md):
        return ""
    keep = [ln[2:].strip() for ln in open(md) if ln.startswith(("- date:", "- device:", "- command:"))]
    return "\n" + "; ".join(k.split(";")[0] for k in keep)


def decode_plot(path, out):
    rows = [r for r in csv.DictReader(open(path)) if r["phase"] == "decode" and r["ms"]]
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        panels[(r["model"], int(r["B"]))][r["system"]].append((int(r["T"]), float(r["ms"])))
    keys = sorted(panels, key=lambda k: (k[0], k[1]))
    n = len(keys)
    cols = min(4, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for system, pts in sorted(panels[key].items()):
            pts.sort()
            style = {"HF eager (sdpa)": "o-", "Inductor": "s--", "mla": "^-"}.get(system, "o-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=COLORS.get(system), label=system,
                    markerfacecolor="none" if system == "Inductor" else None, markersize=7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{key[0]}, B={key[1]}")
        ax.set_xlabel("context T (tokens)")
        ax.set_ylabel("decode step (ms)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    meta = _run_line(path)
    fig.suptitle("Decode step latency vs context (2-layer models, bf16, random weights; Inductor and mla with CUDA "
                 f"graphs; v32 = DSA, mla sparse_absorbed){meta}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def forms_plots(path, out_bars, out_scatter):
    rows = list(csv.DictReader(open(path)))
    pts = defaultdict(dict)
    preds = defaultdict(dict)
    for r in rows:
        key = (int(r["B"]), int(r["S"]), int(r["T"]), int(r["H"]), int(r["k"]))
        if r["measured_s"]:
            pts[key][r["form"]] = float(r["measured_s"]) * 1e6
        preds[key][r["form"]] = float(r["pred_table_s"]) * 1e6
    keys = sorted((k for k in pts if len(pts[k]) >= 2), key=lambda k: (k[1], k[2], k[0], k[3], k[4]))
    forms = ["expanded", "absorbed", "sparse_absorbed", "sparse_expanded"]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(keys)), 4.8))
    width = 0.2
    for i, f in enumerate(forms):
        xs, ys, edge = [], [], []
        for j, k in enumerate(keys):
            if f in pts[k]:
                xs.append(j + (i - 1.5) * width)
                ys.append(pts[k][f])
                cand = {g: t for g, t in preds[k].items() if g in ("expanded", "absorbed") or (k[4] and k[2] > k[4])}
                edge.append("black" if min(cand, key=cand.get) == f else "none")
        ax.bar(xs, ys, width, color=COLORS[f], label=f, edgecolor=edge, linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"B{k[0]}\nS{k[1]}\nT{k[2]}\nH{k[3]}" + ("\nDSA" if k[4] else "") for k in keys], fontsize=6)
    ax.set_ylabel("measured time (us)")
    ax.set_title("Per-form time at each grid point (black outline: the cost model's choice, h200 table)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_bars, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = float("inf"), 0.0
    for f in forms:
        xy = [(preds[k][f], pts[k][f]) for k in pts if f in pts[k] and f in preds[k]]
        if not xy:
            continue
        ax.scatter([a for a, _ in xy], [b for _, b in xy], s=18, color=COLORS[f], label=f)
        lo = min(lo, *[min(a, b) for a, b in xy])
        hi = max(hi, *[max(a, b) for a, b in xy])
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted (us, h200 table, default efficiencies)")
    ax.set_ylabel("measured (us)")
    ax.set_title("Cost model vs measurement per form")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_scatter, dpi=110)
    plt.close(fig)
    return out_bars, out_scatter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="NVIDIA-H200")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args()
    made = []
    gen = os.path.join(a.results, f"generate-{a.device}.csv")
    if os.path.exists(gen):
        made.append(decode_plot(gen, os.path.join(a.results, f"decode-latency-{a.device}.png")))
    forms = os.path.join(a.results, f"forms-{a.device}.csv")
    if os.path.exists(forms):
        made += forms_plots(forms, os.path.join(a.results, f"forms-breakdown-{a.device}.png"),
                            os.path.join(a.results, f"forms-pred-vs-meas-{a.device}.png"))
    for m in made:
        print(m)


if __name__ == "__main__":
    main()
