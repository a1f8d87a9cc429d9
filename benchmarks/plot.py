"""Plots from the benchmark CSVs (runs on a CPU; needs matplotlib).

    python benchmarks/plot.py [--results DIR] [--device NVIDIA-H200]

e2e-<device>*.csv (e2e.py) -> e2e-<device>*.png: decode ms/token against prompt length, log-log, one
panel per (model, batch), one line per system.
forms-<device>*.csv (forms.py) -> forms-breakdown-<device>*.png: measured time of every form at each
grid point (log scale; the cost model's choice outlined), and forms-pred-vs-meas-<device>*.png:
predicted (h200 table) against measured time per form.
Each figure's title ends with the device, date and command from the markdown report beside its CSV.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import RESULTS  # noqa: E402

FORMS = ("expanded", "absorbed", "sparse_absorbed", "sparse_expanded")
COLORS = {"hf-eager": "tab:red", "hf-static": "tab:purple", "inductor": "tab:orange", "mla-static": "tab:cyan",
          "mla": "tab:blue", "expanded": "tab:red", "absorbed": "tab:blue", "sparse_absorbed": "tab:green",
          "sparse_expanded": "tab:purple"}
STYLES = {"hf-eager": "o-", "hf-static": "v--", "inductor": "s--", "mla-static": "D-", "mla": "^-"}


def run_line(csv_path: str) -> str:
    """'\n<device; date; command>' from the markdown report written beside the CSV, if there is one."""
    md = csv_path[:-4] + ".md"
    if not os.path.exists(md):
        return ""
    keep = [ln[2:].strip() for ln in open(md) if ln.startswith(("- device:", "- date:", "- command:"))]
    return "\n" + "; ".join(keep)


def e2e_plot(path: str, out: str) -> str:
    rows = [r for r in csv.DictReader(open(path)) if r.get("decode_ms")]
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        panels[(r["model"], int(r["batch"]))][r["system"]].append((int(r["prompt"]), float(r["decode_ms"])))
    keys = sorted(panels)
    n = max(len(keys), 1)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for system, pts in sorted(panels[key].items(), key=lambda kv: list(COLORS).index(kv[0])
                                  if kv[0] in COLORS else 99):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], STYLES.get(system, "o-"), color=COLORS.get(system),
                    label=system, markersize=6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{key[0]}, B={key[1]}", fontsize=10)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("decode ms/token")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if keys:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle("generate(): decode ms/token against prompt length" + run_line(path), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def forms_plots(path: str, out_bars: str, out_scatter: str) -> tuple[str, str]:
    rows = list(csv.DictReader(open(path)))
    pts = defaultdict(dict)
    preds = defaultdict(dict)
    for r in rows:
        key = (int(r["B"]), int(r["S"]), int(r["T"]), int(r["H"]), int(r["k"]))
        if r["measured_s"]:
            pts[key][r["form"]] = float(r["measured_s"]) * 1e6
        preds[key][r["form"]] = float(r["pred_table_s"]) * 1e6
    keys = sorted((k for k in pts if len(pts[k]) >= 2), key=lambda k: (k[1], k[2], k[0], k[3], k[4]))
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(keys)), 4.8))
    width = 0.2
    for i, f in enumerate(FORMS):
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
    ax.set_title("Per-form time at each grid point (black outline: the cost model's choice, h200 table)"
                 + run_line(path), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_bars, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = float("inf"), 0.0
    for f in FORMS:
        xy = [(preds[k][f], pts[k][f]) for k in pts if f in pts[k] and f in preds[k]]
        if not xy:
            continue
        ax.scatter([a for a, _ in xy], [b for _, b in xy], s=18, color=COLORS[f], label=f)
        lo = min(lo, *[min(a, b) for a, b in xy])
        hi = max(hi, *[max(a, b) for a, b in xy])
    if hi:
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted (us, h200 table)")
    ax.set_ylabel("measured (us)")
    ax.set_title("Cost model vs measurement per form" + run_line(path), fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_scatter, dpi=110)
    plt.close(fig)
    return out_bars, out_scatter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=RESULTS, help="the folder holding the CSVs; plots are written beside them")
    ap.add_argument("--device", default="", help="only CSVs of this device label, e.g. NVIDIA-H200")
    a = ap.parse_args()
    made = []
    for path in sorted(glob.glob(os.path.join(a.results, f"e2e-{a.device}*.csv"))):
        made.append(e2e_plot(path, path[:-4] + ".png"))
    for path in sorted(glob.glob(os.path.join(a.results, f"forms-{a.device}*.csv"))):
        tail = os.path.basename(path)[len("forms-"):-4]
        made += forms_plots(path, os.path.join(a.results, f"forms-breakdown-{tail}.png"),
                            os.path.join(a.results, f"forms-pred-vs-meas-{tail}.png"))
    for m in made:
        print(m)


if __name__ == "__main__":
    main()
