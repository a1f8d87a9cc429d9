"""What the benchmark scripts share: where results go, the header of a result file, result tables as
markdown and csv, timing, and the device's measured ceilings.

Every result file starts with the device, the date (UTC), the versions and the exact command that
wrote it; the figures in it carry no other provenance. Results go to the script's `--out` folder,
else to $OUT where set (the GPU machine's way back), else to benchmarks/results/.

Nothing here needs CUDA at import time; the timing helpers take the device they time.
"""

from __future__ import annotations

import csv
import datetime
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------------
# where results go, and what their header says

def out_dir(arg: str | None = None) -> str:
    """The folder results are written to (created): `arg`, else $OUT, else benchmarks/results."""
    path = arg or os.environ.get("OUT") or RESULTS
    os.makedirs(path, exist_ok=True)
    return path


def device_name(device=None) -> str:
    """The device's name as the driver reports it ("NVIDIA H200"), or "cpu"."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def device_label(device=None) -> str:
    """The device's name as it appears in result file names ("NVIDIA-H200", "cpu")."""
    return device_name(device).replace(" ", "-").replace("/", "-")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for mod in ("triton", "transformers"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} absent")
    parts.append(f"CUDA {torch.version.cuda}")
    return ", ".join(parts)


def command() -> str:
    """The command line that started this process, as it can be typed again."""
    return "python " + shlex.join(sys.argv)


def header(title: str, device=None, notes=()) -> list[str]:
    """The first lines of a result file: title, device (a torch device, or its name as a string), date
    (UTC), versions, command, then `notes`."""
    return [f"# {title}", "",
            f"- device: {device if isinstance(device, str) else device_name(device)}",
            f"- date: {utc_now()}",
            f"- versions: {versions()}",
            f"- command: `{command()}`",
            *[f"- {n}" for n in notes], ""]


# ---------------------------------------------------------------------------------------------------
# result tables

@dataclass
class Table:
    """One table of a report: `columns` are (key, heading) pairs; `rows` are dicts by key."""
    title: str
    columns: list[tuple[str, str]]
    rows: list[dict] = field(default_factory=list)
    text: str = ""          # a paragraph printed under the title


def fmt(value) -> str:
    """A cell: '-' for missing; floats to about four significant digits (none after the point from 1000)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        a = abs(value)
        return f"{value:.0f}" if a >= 1000 else f"{value:.1f}" if a >= 10 else f"{value:.2f}" if a >= 1 \
            else f"{value:.3g}"
    return str(value)


def markdown(table: Table) -> list[str]:
    lines = [f"## {table.title}", ""] if table.title else []
    if table.text:
        lines += [table.text, ""]
    lines.append("| " + " | ".join(h for _, h in table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    for r in table.rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for k, _ in table.columns) + " |")
    return lines + [""]


def write_report(stem: str, head: list[str], tables: list[Table], out: str | None = None,
                 tail: list[str] = (), echo: bool = True) -> tuple[str, str]:
    """Write <stem>.md (header, tables, tail) and <stem>.csv (every table's rows, with a `table`
    column when there are several) into out_dir(out); print the markdown if echo. Returns both paths."""
    folder = out_dir(out)
    md = os.path.join(folder, stem + ".md")
    lines = list(head)
    for t in tables:
        lines += markdown(t)
    lines += list(tail)
    text = "\n".join(lines).rstrip() + "\n"
    with open(md, "w") as f:
        f.write(text)
    if echo:
        print(text, flush=True)
    keys: list[str] = ["table"] if len(tables) > 1 else []
    for t in tables:
        keys += [k for k, _ in t.columns if k not in keys]
    path = os.path.join(folder, stem + ".csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        for t in tables:
            for r in t.rows:
                w.writerow({**({"table": t.title} if len(tables) > 1 else {}), **r})
    return md, path


# ---------------------------------------------------------------------------------------------------
# timing

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_events(fn, n: int) -> float:
    """Seconds per call of `fn`, CUDA events around `n` back-to-back calls (after a synchronize)."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / n


def time_wall(fn, device, n: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of one call of `fn`, synchronizing `device` around each call."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_rate(device="cuda", gib: float = 1.0) -> float:
    """Bytes per second of a large device-to-device copy, bytes read plus bytes written (median of
    CUDA-event-timed copies of `gib` GiB)."""
    x = torch.empty(int(gib * (1 << 30)) // 2, device=device, dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    t = statistics.median(time_events(lambda: y.copy_(x), 5) for _ in range(5))
    bw = 2 * x.numel() * x.element_size() / t
    del x, y
    torch.cuda.empty_cache()
    return bw


def matmul_rate(device="cuda", dtype=torch.bfloat16, n: int = 8192) -> float:
    """FLOP/s of an n^3 matmul in `dtype` (median of CUDA-event-timed runs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = statistics.median(time_events(lambda: a @ b, 10) for _ in range(5))
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / t
