"""Load the vendored MLA code of other projects on a CPU, replacing only what needs a GPU or a cluster.

The vendored files are kept byte for byte as their authors published them (see README.md). Each
imports modules that exist only on a GPU machine or in its own repository; this module puts plain
torch stand-ins under those names while the file is imported, and nowhere else (sys.modules is
restored afterwards, so no other test sees them):

DeepSeek-V3 `inference/model.py`:
    `kernel` (Triton fp8 kernels): act_quant, weight_dequant, fp8_gemm in plain torch. With float32
    weights `linear()` takes its F.linear branch and never calls them; they exist so the import works.
    `world_size` / `rank` are the file's own globals (1 / 0), set explicitly.
DeepSeek-V3.2-Exp `inference/model.py`:
    `kernel` (tilelang fp8 kernels): act_quant, fp8_gemm, fp8_index in plain torch (same block
    quantisation to float8_e4m3fn, the index score computed from the dequantised values).
    `einops.rearrange`: the one pattern the file uses ('b s (h d) -> b s h d'), as a view.
    `rotate_activation` (fast_hadamard_transform, bf16 only): the same Hadamard transform as a
    matrix product, any float dtype.
    `dist` (torch.distributed): broadcast is the identity, as it is for one process.
    `optimize=1` compiles the file as `python -O` does (asserts left out, nothing else changed).
FlashInfer `tests/attention/test_mla_decode_kernel.py`:
    `flashinfer`, `flashinfer.utils`, `tvm_ffi`, `tests.test_helpers.test_helpers`: the names it
    imports, unused by the reference class `DeepseekV2AttentionVanilla`.
    `tests.test_helpers.rope_reference`: the vendored file itself, with `precompute_freqs_cis`
    defaulting to the CPU instead of "cuda:0".
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).parent
FP8_MAX = 448.0


def _load(path: Path, name: str, stand_ins: dict[str, types.ModuleType], optimize: int = -1) -> types.ModuleType:
    """Import the file at `path` as a fresh module `name`, with `stand_ins` in sys.modules meanwhile.
    optimize=1 compiles it as `python -O` would (its assert statements left out); -1 as this
    interpreter does."""
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        # Registered under its own name (never the stand-ins'): Dynamo looks a traced function's
        # globals up through sys.modules[fn.__module__].
        sys.modules[name] = mod
        if optimize == -1:
            spec.loader.exec_module(mod)
        else:
            exec(compile(path.read_text(), str(path), "exec", optimize=optimize), mod.__dict__)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


# --------------------------------------------------------------------------------------------- #
# DeepSeek's fp8 kernels, in plain torch.

def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt=None):
    """Per-row blocks of `block_size` scaled to float8_e4m3fn; returns (values, float32 scales)."""
    blocks = x.float().unflatten(-1, (-1, block_size))
    amax = blocks.abs().amax(-1).clamp_min(1e-4)
    s = amax / FP8_MAX
    if scale_fmt is not None:                       # the kernels' power-of-two rounding
        s = torch.exp2(torch.ceil(torch.log2(s)))
    y = (blocks / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return y.flatten(-2), s


def weight_dequant(weight: torch.Tensor, scale: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """[M, N] fp8 weight times its [ceil(M/b), ceil(N/b)] block scales, in the default dtype."""
    M, N = weight.shape
    s = scale.repeat_interleave(block_size, 0)[:M].repeat_interleave(block_size, 1)[:, :N]
    return (weight.float() * s).to(torch.get_default_dtype())


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """a [..., K] fp8 with per-row block scales, b [N, K] fp8 with block scales: a @ b^T."""
    a_deq = (a.float().unflatten(-1, (-1, 128)) * a_s.unsqueeze(-1)).flatten(-2)
    return (a_deq @ weight_dequant(b, b_s).float().T).to(torch.get_default_dtype())


def fp8_index(q: torch.Tensor, q_s: torch.Tensor, k: torch.Tensor, k_s: torch.Tensor) -> torch.Tensor:
    """sum over heads of relu(q . k) * q_s, times k_s: q [b, m, h, d], q_s [b, m, h(, 1)], k [b, n, d],
    k_s [b, n(, 1)] -> [b, m, n] (the tilelang kernel's contract, on the stored fp8 values)."""
    logits = torch.einsum("bmhd,bnd->bmhn", q.float(), k.float()).relu()
    logits = logits * q_s.reshape(*q_s.shape[:3], 1)
    return logits.sum(2) * k_s.reshape(k_s.shape[0], 1, k_s.shape[1])


def _kernel_module() -> types.ModuleType:
    return _module("kernel", act_quant=act_quant, weight_dequant=weight_dequant, fp8_gemm=fp8_gemm,
                   fp8_index=fp8_index)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """fast_hadamard_transform.hadamard_transform(x, scale=n ** -0.5) for n a power of two."""
    n = x.shape[-1]
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise ValueError(f"Hadamard transform of width {n}: not a power of two")
    return (x.float() @ (h * n ** -0.5).to(x.device)).to(x.dtype)


def _rearrange(x: torch.Tensor, pattern: str, **sizes) -> torch.Tensor:
    if pattern.replace(" ", "") != "bs(hd)->bshd" or set(sizes) != {"d"}:
        raise NotImplementedError(f"the einops stand-in knows one pattern, not {pattern!r} {sizes}")
    return x.unflatten(-1, (-1, sizes["d"]))


class _OneProcess:
    """torch.distributed for one process: broadcast from rank 0 leaves the tensor as it is."""

    @staticmethod
    def broadcast(tensor, src=0, *args, **kwargs):
        return None

    @staticmethod
    def is_initialized():
        return False


# --------------------------------------------------------------------------------------------- #
# Loaders.

def deepseek(version: str, attn_impl: str | None = None, dtype: torch.dtype = torch.float32,
             optimize: int = -1) -> types.ModuleType:
    """A fresh import of DeepSeek's `inference/model.py` ("v3" or "v3.2-exp"), set up for one CPU
    process: world_size 1, rank 0, Linear weights in `dtype`, and for V3 the given `attn_impl`.
    optimize=1 compiles the file as `python -O` (PYTHONOPTIMIZE=1) would, without its asserts: what a
    user runs so that V3.2-Exp's indexer assert does not break Dynamo's graph."""
    file = {"v3": "deepseek_v3_model.py", "v3.2-exp": "deepseek_v32_exp_model.py"}[version]
    stand_ins = {"kernel": _kernel_module()}
    if version == "v3.2-exp":
        stand_ins["einops"] = _module("einops", rearrange=_rearrange)
    name = f"foreign_deepseek_{version.replace('.', '').replace('-', '_')}_{attn_impl or 'default'}"
    if optimize != -1:
        name += f"_O{optimize}"
    mod = _load(HERE / file, name, stand_ins, optimize)
    mod.world_size, mod.rank = 1, 0
    mod.Linear.dtype = dtype
    if attn_impl is not None:
        if not hasattr(mod, "attn_impl"):
            raise ValueError(f"{file} has no attn_impl switch")
        mod.attn_impl = attn_impl
    if version == "v3.2-exp":
        mod.rotate_activation = hadamard
        mod.dist = _OneProcess
    return mod


def flashinfer_reference() -> types.ModuleType:
    """A fresh import of FlashInfer's MLA decode test file (for `DeepseekV2AttentionVanilla`)."""
    rope = _load(HERE / "flashinfer_rope_reference.py", "foreign_flashinfer_rope_reference", {})
    rope.precompute_freqs_cis = functools.partial(rope.precompute_freqs_cis, device="cpu")
    helpers = _module("tests.test_helpers", __path__=[])
    stand_ins = {
        "flashinfer": _module("flashinfer", __path__=[]),
        "flashinfer.utils": _module("flashinfer.utils", is_sm90a_supported=lambda *a, **k: False),
        "tests.test_helpers": helpers,
        "tests.test_helpers.rope_reference": rope,
        "tests.test_helpers.test_helpers": _module("tests.test_helpers.test_helpers",
                                                   skip_on_gpu_arch_error=lambda f: f),
        "tvm_ffi": _module("tvm_ffi", use_torch_stream=contextlib.nullcontext),
    }
    return _load(HERE / "flashinfer_mla_decode_reference.py", "foreign_flashinfer_mla_decode", stand_ins)


def scale_weights_(module: torch.nn.Module, seed: int) -> None:
    """Redraw every 2-D weight as N(0, 1/fan_in) from `seed`: FlashInfer's reference draws N(0, 1),
    whose scores saturate the softmax to one-hot rows, where a wrong key would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
