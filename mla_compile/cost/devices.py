"""Roofline device models: what a device can do, as a table that measurements update.

A form's time on a device is  sum over its kernels of
    max(flops / (matmul_rate * eff[form.kernel]) + vector / vector_flops,  bytes / (mem_bw * mem_eff))
    + launches * launch_overhead

Figures and where they come from
--------------------------------
* h200: *measured* on an H200: bf16 8192^3 matmul 687 TFLOP/s (nominal 989.4 dense) and device
  copy 4.27 TB/s, bytes read + written (nominal 4.8 TB/s).
* Every other GPU: the vendor's nominal dense figure (no sparsity) times the H200's measured /
  nominal ratio (matmul 687/989.4 = 0.694, memory 4.27/4.8 = 0.890), so that all GPU entries mean
  "achievable ceiling" like the measured one.  The nominal figures are kept in `nominal`.
    h100 (SXM5):  989.4 bf16/fp16, 494.7 tf32, 66.9 fp32 TFLOP/s, 3.35 TB/s HBM3
    a100 (SXM4 80GB): 312 bf16, 156 tf32, 19.5 fp32 TFLOP/s, 2.039 TB/s
    l40s: 362 bf16, 183 tf32, 91.6 fp32 TFLOP/s, 0.864 TB/s GDDR6
    b200 (HGX): 2250 bf16, 1125 tf32, 80 fp32 TFLOP/s, 8.0 TB/s HBM3e
* cpu: a *placeholder* (1 TFLOP/s fp32, 50 GB/s, 10 us per torch op) until `calibrate()` measures
  the machine.  On the CPU the forms run their plain-torch references, which compute half dtypes in
  float32 (`upcast_half`) and materialise the score matrix (`fused_attention` False).
* float32 on a GPU uses the TF32 rate when torch.get_float32_matmul_precision() is not "highest"
  (Triton's tl.dot and cuBLAS then use TF32), else the plain FP32 rate.
* vector_flops: the non-tensor FP32 rate used for the softmax's element-wise work (nominal x 0.694).
* launch_overhead: 8 us fixed cost per GPU kernel (launch, ramp-up, tail), fitted on the H200 grid.
* sm_count: SMs, for kernels that can launch fewer programs than that (expanded attention).

Efficiency factors: fraction of the matmul ceiling a kernel reaches, looked up as "form.kernel",
then "form", then "default"; `mem_efficiency` likewise scales the copy bandwidth.  The attention
kernels' values are fitted to measurements on an H200 (`benchmarks/forms.py`,
`benchmarks/kernel_bench.py`; see DEFAULT_EFFICIENCY): our Triton absorbed kernels reach 0.21-0.31 of the matmul ceiling where
compute-bound (FlashMLA reaches ~0.7), the expanded prefill kernel 0.64, and 0.64-1.0 of the copy rate
where memory-bound; the heads-major Hopper Gluon kernel of the absorbed decode 0.89 (HOPPER_DECODE_KEY,
on the sm_90 entries; plan() uses it where that kernel runs), the keys-major one at <= 32 heads 0.39
and 1.12 of the copy rate (KEYS_MAJOR_DECODE_KEY).  The cuBLAS GEMMs keep 0.85 (expansion) and 0.60
(the small per-head GEMMs of absorption and output), and the default 0.85 of the copy rate.
docs/performance.md lists each figure with what it was fitted on.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

H200_MATMUL_RATIO = 687e12 / 989.4e12
H200_MEMORY_RATIO = 4.27e12 / 4.8e12

# The attention kernels' figures are *fitted*: a log-error fit of each kernel's compute and memory
# efficiency to `benchmarks/forms.py` on an H200. absorbed and sparse_absorbed: a grid of 83 points
# (seed 0); expanded.attention: the 66 points with two or more forms of the seed-0 grid in
# docs/performance.md, measured with the expanded kernel's block map and skipped causal triangle (with
# these figures the model picks the fastest form at 62 of those 66 points). They describe our Triton
# kernels and the plain-torch sparse_expanded reference, so every GPU entry uses them. The GEMMs are
# cuBLAS's.
DEFAULT_EFFICIENCY = {
    "default": 0.70,
    "expanded.expand": 0.85,
    "expanded.attention": 0.64,
    "absorbed.absorb": 0.60,
    "absorbed.attention": 0.31,
    "absorbed.output": 0.60,
    "sparse_absorbed.absorb": 0.60,
    "sparse_absorbed.attention": 0.21,
    "sparse_absorbed.output": 0.60,
    "sparse_expanded.expand": 0.60,
    "sparse_expanded.attention": 0.02,
}
DEFAULT_MEM_EFFICIENCY = {
    "default": 0.85,
    "expanded.attention": 1.0,
    "absorbed.attention": 0.77,
    "sparse_absorbed.attention": 0.64,
    "sparse_expanded.attention": 0.02,
}
# The heads-major Hopper Gluon kernel (kernels/absorbed_decode_seesaw.py, FlashMLA's schedule) runs the
# absorbed attention at one query position on sm_90 (more than 32 heads, r = 512, dr = 64, bf16/fp16)
# and is faster than the Triton kernel the figures above describe. Its compute efficiency is fitted on
# `python benchmarks/kernel_bench.py` on an H200 (the eight H=128 points with B >= 8 and T >= 4096,
# each point's efficiency solved so that plan()'s attention step equals the measured core time;
# per point 0.85-0.93, geometric mean 0.889): plan() uses it for "absorbed.attention" where that kernel
# applies, on the entries that carry it (h100, h200).
HOPPER_DECODE_KEY = "absorbed.attention@sm90_decode"
HOPPER_DECODE_EFFICIENCY = 0.89
# The keys-major Gluon kernel (kernels/absorbed_decode_keys_major.py) takes the same calls at <= 32 heads,
# where they are memory-bound. Fitted on its measured core times on an H200 at 48 points (B >= 8,
# H = 8/16/20/32; RMS log error 0.13 against 0.29 with the Triton figures): compute 0.39, memory 1.12
# of the copy rate. Above 1 because the copy rate counts a copy's bytes read and written while this
# kernel streams reads, and the model's fixed 2 x 8 us per op is more than this kernel's at large sizes.
KEYS_MAJOR_DECODE_KEY = "absorbed.attention@sm90_keys_major"
KEYS_MAJOR_DECODE_EFFICIENCY = 0.39
KEYS_MAJOR_DECODE_MEM_EFFICIENCY = 1.12
# Fixed cost per GPU kernel (launch, ramp-up and tail), fitted with the efficiencies above; a bare
# launch under CUDA graphs is ~1 us (calibrate() reports it), eager launches from Python ~5-20 us.
GPU_KERNEL_OVERHEAD = 8e-6

# the plain-torch references on a CPU: bmm reaches most of the measured matmul rate; the unfused
# element-wise passes are already counted as bytes
CPU_EFFICIENCY = {"default": 0.80}
CPU_MEM_EFFICIENCY = {"default": 0.70}

DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass
class DeviceModel:
    name: str
    matmul_flops: dict            # "bf16", "fp16", "tf32", "fp32" -> FLOP/s ceiling
    vector_flops: float           # non-tensor FP32 FLOP/s (softmax element-wise work)
    mem_bw: float                 # bytes/s, read + written
    launch_overhead: float        # seconds per launch
    sm_count: int = 132           # streaming multiprocessors (occupancy of kernels with few programs)
    efficiency: dict = field(default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    mem_efficiency: dict = field(default_factory=lambda: dict(DEFAULT_MEM_EFFICIENCY))
    fused_attention: bool = True  # the forms run as fused kernels (False: unfused torch references)
    upcast_half: bool = False     # half dtypes are computed in float32 (the references do)
    nominal: dict = field(default_factory=dict)
    source: str = ""
    measured: bool = False
    warning: Optional[str] = None

    # -- figures -------------------------------------------------------------------------------
    def matmul_rate(self, dtype: torch.dtype = torch.bfloat16) -> float:
        """The matmul ceiling (FLOP/s) for inputs of `dtype` on this device."""
        if dtype == torch.float64:
            return float(self.matmul_flops["fp32"]) / 2.0
        if self.upcast_half or dtype == torch.float32:
            if self.fused_attention and torch.get_float32_matmul_precision() != "highest":
                return float(self.matmul_flops.get("tf32", self.matmul_flops["fp32"]))
            return float(self.matmul_flops["fp32"])
        return float(self.matmul_flops.get(DTYPE_KEYS.get(dtype, "bf16"), self.matmul_flops["bf16"]))

    def eff(self, form: str, kernel: str) -> float:
        t = self.efficiency
        return float(t.get(f"{form}.{kernel}", t.get(form, t.get("default", 0.7))))

    def mem_eff(self, form: str, kernel: str) -> float:
        t = self.mem_efficiency
        return float(t.get(f"{form}.{kernel}", t.get(form, t.get("default", 0.85))))

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceModel":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def copy(self, **changes) -> "DeviceModel":
        m = copy.deepcopy(self)
        for k, v in changes.items():
            setattr(m, k, v)
        return m


def _gpu(name, bf16, tf32, fp32, bw, *, sms=132, measured=None, source=""):
    """A GPU entry from nominal dense figures (TFLOP/s, TB/s), derated by the H200 measured ratios
    unless measured figures are given."""
    nominal = {"bf16": bf16 * 1e12, "fp16": bf16 * 1e12, "tf32": tf32 * 1e12, "fp32": fp32 * 1e12, "mem_bw": bw * 1e12}
    mm = {k: v * H200_MATMUL_RATIO for k, v in nominal.items() if k != "mem_bw"}
    mem = bw * 1e12 * H200_MEMORY_RATIO
    if measured:
        mm["bf16"] = mm["fp16"] = measured["bf16"]
        mem = measured["mem_bw"]
    return DeviceModel(name=name, matmul_flops=mm, vector_flops=fp32 * 1e12 * H200_MATMUL_RATIO, mem_bw=mem,
                       launch_overhead=GPU_KERNEL_OVERHEAD, sm_count=sms, nominal=nominal,
                       source=source or "nominal dense figures x H200 measured/nominal ratio")


def _hopper(model: DeviceModel) -> DeviceModel:
    model.efficiency[HOPPER_DECODE_KEY] = HOPPER_DECODE_EFFICIENCY
    model.efficiency[KEYS_MAJOR_DECODE_KEY] = KEYS_MAJOR_DECODE_EFFICIENCY
    model.mem_efficiency[KEYS_MAJOR_DECODE_KEY] = KEYS_MAJOR_DECODE_MEM_EFFICIENCY
    return model


DEVICES: dict[str, DeviceModel] = {
    "h100": _hopper(_gpu("h100", 989.4, 494.7, 66.9, 3.35)),
    "h200": _hopper(_gpu("h200", 989.4, 494.7, 66.9, 4.8, measured={"bf16": 687e12, "mem_bw": 4.27e12},
                         source="measured on an H200: bf16 matmul 687 TFLOP/s, copy 4.27 TB/s; "
                                "tf32/fp32 nominal x 0.694")),
    "a100": _gpu("a100", 312.0, 156.0, 19.5, 2.039, sms=108),
    "l40s": _gpu("l40s", 362.05, 183.0, 91.6, 0.864, sms=142),
    "b200": _gpu("b200", 2250.0, 1125.0, 80.0, 8.0, sms=148),
    "cpu": DeviceModel(
        name="cpu", matmul_flops={"bf16": 1e12, "fp16": 1e12, "tf32": 1e12, "fp32": 1e12},
        vector_flops=0.2e12, mem_bw=50e9, launch_overhead=10e-6,
        efficiency=dict(CPU_EFFICIENCY), mem_efficiency=dict(CPU_MEM_EFFICIENCY),
        fused_attention=False, upcast_half=True,
        source="placeholder (1 TFLOP/s fp32, 50 GB/s, 10 us/op): run calibrate() to measure this CPU"),
}

# substrings of torch.cuda.get_device_name() -> table key, checked in order
GPU_NAMES = (("B200", "b200"), ("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("L40S", "l40s"))


def table_key_for_gpu(gpu_name: str) -> Optional[str]:
    up = gpu_name.upper()
    for sub, key in GPU_NAMES:
        if sub in up:
            return key
    return None


def table_entry(name: str) -> DeviceModel:
    """A copy of the table entry `name` ("h100", "h200", "a100", "l40s", "b200", "cpu")."""
    key = name.lower()
    if key not in DEVICES:
        raise KeyError(f"unknown device {name!r}: expected one of {sorted(DEVICES)} or a torch.device")
    return DEVICES[key].copy()
