"""Measure the current device and cache its model; load the cached model or the table entry.

    calibrate(device=None) -> DeviceModel    # measures, writes <cache>/device-<key>.json
    load_device(device=None) -> DeviceModel  # cached calibration if any, else the table entry

Cache directory: $MLA_COMPILE_CACHE_DIR, else $XDG_CACHE_HOME/mla_compile, else ~/.cache/mla_compile.
Measured: the copy bandwidth (bytes read + written), the dense matmul rate (bf16 on CUDA, fp32 on
the CPU, where the references compute half dtypes in fp32), and the per-launch overhead.  What is
not measured (vector rate, TF32/FP32 rates on CUDA, efficiency factors) is kept from the table
(scaled by measured/table for the matmul rates).  The CPU measurement stays under ~3 s.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from mla_compile.cost.devices import DEVICES, DeviceModel, table_entry, table_key_for_gpu

DeviceLike = Union[None, str, torch.device, DeviceModel]


def cache_dir() -> Path:
    env = os.environ.get("MLA_COMPILE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "mla_compile"


def _torch_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):
        try:
            d = torch.device(device)
        except RuntimeError:
            raise KeyError(f"unknown device {device!r}: expected a table name {sorted(DEVICES)}, "
                           "a torch.device or a device string such as 'cuda'") from None
    else:
        d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def device_key(device: torch.device) -> tuple[str, str, Optional[str]]:
    """(cache key, table key, warning) for a torch device."""
    if device.type == "cpu":
        return "cpu", "cpu", None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        key = table_key_for_gpu(gpu)
        if key:
            return key, key, None
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"
        return f"gpu-{slug}", "h100", f"unknown GPU {gpu!r}: using h100-like figures; run calibrate()"
    return device.type, "cpu", f"no table entry for device type {device.type!r}: using cpu figures"


def cache_path(key: str) -> Path:
    return cache_dir() / f"device-{key}.json"


def _base_model(device: torch.device) -> tuple[str, DeviceModel]:
    key, table, warning = device_key(device)
    model = table_entry(table)
    if warning:
        model = model.copy(name=key, warning=warning)
    return key, model


def load_device(device: DeviceLike = None) -> DeviceModel:
    """The cached calibration of `device` when there is one, else its table entry.

    `device`: a DeviceModel (returned as is), a table name ("h100", "h200", "a100", "l40s", "b200",
    "cpu"), a torch.device / device string ("cuda", "cuda:1", "cpu"), or None (the current device).
    An unknown GPU gets h100-like figures with `.warning` set (and a Python warning).
    """
    if isinstance(device, DeviceModel):
        return device
    if isinstance(device, str) and device.lower() in DEVICES:
        key, model = device.lower(), table_entry(device)
    else:
        key, model = _base_model(_torch_device(device))
    path = cache_path(key)
    if path.is_file():
        try:
            cached = DeviceModel.from_dict(json.loads(path.read_text()))
            if cached.fused_attention:
                # a calibration measures the device's rates; the kernels' efficiencies and fixed cost
                # belong to this version of the kernels, so an older cache does not keep stale ones
                cached.efficiency = dict(model.efficiency)
                cached.mem_efficiency = dict(model.mem_efficiency)
                cached.launch_overhead = model.launch_overhead
            return cached
        except (ValueError, TypeError, OSError) as exc:
            warnings.warn(f"mla_compile: ignoring unreadable device cache {path}: {exc}")
    if model.warning:
        warnings.warn(f"mla_compile: {model.warning}")
    return model


# -- measurements ------------------------------------------------------------------------------

def _time_cuda(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _time_cpu(fn, reps: int, budget: float) -> float:
    fn()
    times, start = [], time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return min(times)


def _measure_cuda(device: torch.device) -> dict:
    with torch.cuda.device(device):
        n = 1 << 29                                     # 1 GiB of bf16
        src = torch.empty(n, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        copy_s = _time_cuda(lambda: dst.copy_(src), 10)
        del src, dst
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        mm_s = _time_cuda(lambda: torch.mm(a, b), 10)
        del a, b
        # The per-kernel cost that matters is the one under CUDA graphs (how decode runs): timing
        # eager launches measures Python and driver overhead instead (~90 us seen on an H200).
        x = torch.zeros(1, device=device)
        per_graph = 100
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                x.add_(1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                x.add_(1)
        launch = _time_cuda(graph.replay, 10) / per_graph
    return {"mem_bw": 2 * n * 2 / copy_s, "matmul": 2 * m ** 3 / mm_s, "launch": launch}


def _measure_cpu() -> dict:
    n = 1 << 25                                         # 128 MiB of fp32
    src = torch.ones(n)
    dst = torch.empty_like(src)
    copy_s = _time_cpu(lambda: dst.copy_(src), 5, 0.3)
    del src, dst
    rate, m = 0.0, 512
    while True:                                         # grow the matmul until one takes ~30 ms
        a, b = torch.randn(m, m), torch.randn(m, m)
        t = _time_cpu(lambda: torch.mm(a, b), 3, 0.4)
        rate = max(rate, 2 * m ** 3 / t)
        if t > 0.03 or m >= 2048:
            break
        m *= 2
    x = torch.zeros(16)
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        x.add_(1)
    launch = (time.perf_counter() - t0) / reps
    return {"mem_bw": 2 * n * 4 / copy_s, "matmul": rate, "launch": launch}


def calibrate(device: DeviceLike = None, *, save: bool = True) -> DeviceModel:
    """Measure `device` (None: the current one), write the model to the cache, return it."""
    if isinstance(device, DeviceModel):
        device = None
    if isinstance(device, str) and device.lower() in DEVICES and device.lower() != "cpu":
        device = "cuda"                                 # a GPU table name: measure the current GPU
    tdev = _torch_device(device)
    key, model = _base_model(tdev)
    if tdev.type == "cuda":
        got = _measure_cuda(tdev)
        scale = got["matmul"] / model.matmul_flops["bf16"]
        model.matmul_flops = {k: v * scale for k, v in model.matmul_flops.items()}
        model.matmul_flops["bf16"] = model.matmul_flops["fp16"] = got["matmul"]
        what = f"bf16 {2 * 8192 ** 3 / 1e9:.0f}-GFLOP matmul"
    elif tdev.type == "cpu":
        got = _measure_cpu()
        model.matmul_flops = {k: got["matmul"] for k in ("bf16", "fp16", "tf32", "fp32")}
        model.vector_flops = min(model.vector_flops, got["matmul"])
        what = "fp32 matmul"
    else:
        raise ValueError(f"calibrate: cannot measure device type {tdev.type!r}")
    if tdev.type == "cuda":
        model.sm_count = torch.cuda.get_device_properties(tdev).multi_processor_count
    else:   # the CPU's parallel units are its cores (not the GPU table's default)
        model.sm_count = torch.get_num_threads()
    model.mem_bw = got["mem_bw"]
    if tdev.type != "cuda":
        # GPU: the table's per-kernel fixed cost (fitted with the efficiencies) stays; the bare launch
        # measured under CUDA graphs (~1 us) is only reported. CPU: per-op dispatch is the fixed cost.
        model.launch_overhead = got["launch"]
    model.measured = True
    name = torch.cuda.get_device_name(tdev) if tdev.type == "cuda" else "cpu"
    model.source = (f"calibrated {time.strftime('%Y-%m-%d %H:%M')} on {name} (torch {torch.__version__}): "
                    f"{what} {got['matmul'] / 1e12:.3g} TFLOP/s, copy {got['mem_bw'] / 1e9:.4g} GB/s, "
                    f"launch {got['launch'] * 1e6:.3g} us")
    if save:
        path = cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(model.to_json())
        tmp.replace(path)
    return model
