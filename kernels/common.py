"""What every kernel and every form shares: the argument contract of the MLA forms, its checks,
the form names, and how a kernel is launched.

All forms compute the same function as Hugging Face's MLA attention core,

    K = [c W_UK^T, kp]   (per head; kp shared by all heads)     V = c W_UV^T
    out = softmax(q K^T * scale + mask) V                       -> [B, H, S, dv]

and take the same arguments, so the backend can swap one for another:

    q_nope  [B, H, S, dn]   the no-RoPE part of the query
    q_rope  [B, H, S, dr]   the RoPE part (dr may be 0)
    latent  [B, 1, T, r] or [B, T, r]      the cached compressed KV (c)
    k_rope  [B, 1, T, dr] or [B, T, dr]    the cached shared RoPE key (kp)
    w_uk    [H, dn, r]      kv_b_proj.weight viewed per head, key half
    w_uv    [H, dv, r]      kv_b_proj.weight viewed per head, value half
    mask    None, bool (True = attend) or additive float, broadcastable to [B, 1, S, T], at most
            4-D and 1 at the head axis (dim -3) where it has one (`check_mask`)
    scale   softmax scale
    is_causal  torch SDPA's meaning: query i sees keys j <= i (top-left aligned), used only when
               HF handed SDPA no mask
    sinks   None or [H]: attention sinks (HY-V4, DeepSeek-V4), one logit per head that joins the
            softmax's normaliser as a key with a zero value, never masked:
            out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink_h))

Errors name the argument at fault and are raised before any arithmetic: bad input gets a clear
error, never a wrong answer or a crash inside a kernel.

Empty sizes: B = 0 or S = 0 is a legitimate empty batch / empty query block and gives an empty
[B, H, S, dv] output; T = 0 (nothing to attend to: softmax over no keys is undefined), k = 0 (a
top-k selection of nothing), H = 0 and r = 0 are errors naming the argument.

Launching: the forms are `torch.library.triton_op`s. When AOTAutograd traces one for Inductor, its
body runs on fake/functional tensors, and each launch must become a `triton_kernel_wrapper` node that
Inductor compiles as its own user-defined kernel (`launcher` gives `wrap_triton(kernel)` then). On
real tensors the kernel's compiled binary is launched directly (`kernels.launch`): wrap_triton's
dispatch, and the JIT's argument binding at every call, would only add host time.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

DENSE_FORMS = ("expanded", "absorbed")
SPARSE_FORMS = ("sparse_absorbed", "sparse_expanded")
FORMS = DENSE_FORMS + SPARSE_FORMS

LOG2E = math.log2(math.e)     # exp(x) = exp2(x * LOG2E): the kernels' exponentials are exp2

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Dims(NamedTuple):
    """The sizes `check_args` read (a NamedTuple, not a frozen dataclass: it is built at every call,
    and a frozen dataclass's __init__ costs ~3 us of Python against ~0.4)."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    rank: int
    rope_dim: int
    nope_dim: int
    v_dim: int
    device: torch.device | None = None


def as_tokens(x: torch.Tensor, name: str) -> torch.Tensor:
    """[B, 1, T, d] (HF's single-head cache layout) or [B, T, d] -> [B, T, d], without a copy."""
    _token_shape(x, name)      # its errors
    return x.squeeze(1) if x.dim() == 4 else x


def _token_shape(x: torch.Tensor, name: str):
    """The [B, T, d] sizes `as_tokens(x, name)` would give, with its errors, without making the view."""
    shape = x.shape
    if len(shape) == 4:
        if shape[1] != 1:
            raise ValueError(f"{name}: expected one shared head (shape [B, 1, T, d]), got {tuple(shape)}")
        return shape[0], shape[2], shape[3]
    if len(shape) != 3:
        raise ValueError(f"{name}: expected [B, 1, T, d] or [B, T, d], got {tuple(shape)}")
    return shape[0], shape[1], shape[2]


_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)


def check_args(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask) -> Dims:
    # Written for host time (it runs at every call of every form, once per layer per decode step):
    # sizes are read once each and compared one by one, no views are made (`_token_shape`), the
    # devices are compared without building a set, and messages are formatted only on the way to
    # raising. The checks, their order and their messages are those of the plain version.
    for t in (q_nope, q_rope, latent, k_rope, w_uk, w_uv):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPE_SET:
            _raise_tensor_type(q_nope, q_rope, latent, k_rope, w_uk, w_uv)
    qs = q_nope.shape
    if len(qs) != 4:
        raise ValueError(f"q_nope: expected [B, H, S, dn], got {tuple(qs)}")
    B, H, S, dn = qs
    rs = q_rope.shape
    if len(rs) != 4 or rs[:3] != (B, H, S):
        raise ValueError(f"q_rope: expected [B={B}, H={H}, S={S}, dr], got {tuple(rs)}")
    dr = rs[3]
    lat_b, T, r = _token_shape(latent, "latent")
    kr_shape = _token_shape(k_rope, "k_rope")
    if lat_b != B:
        raise ValueError(f"latent: batch {lat_b} differs from the query's {B}")
    if T == 0:
        raise ValueError(f"latent: T = 0 cached tokens (shape {tuple(latent.shape)}): attention over no keys "
                         f"is undefined")
    if r == 0:
        raise ValueError(f"latent: kv_lora_rank r = 0 (shape {tuple(latent.shape)})")
    if H == 0:
        raise ValueError(f"q_nope: H = 0 heads (shape {tuple(qs)})")
    if kr_shape != (B, T, dr):
        raise ValueError(f"k_rope: expected [B={B}, 1, T={T}, dr={dr}], got {tuple(k_rope.shape)}")
    uk = w_uk.shape
    if len(uk) != 3 or uk != (H, dn, r):
        raise ValueError(f"w_uk: expected [H={H}, dn={dn}, r={r}], got {tuple(uk)}")
    uv = w_uv.shape
    if len(uv) != 3 or uv[0] != H or uv[2] != r:
        raise ValueError(f"w_uv: expected [H={H}, dv, r={r}], got {tuple(uv)}")
    device = q_nope.device
    same = (q_rope.device == device and latent.device == device and k_rope.device == device
            and w_uk.device == device and w_uv.device == device)
    check_mask(mask, B, S, T)
    if not same or (mask is not None and mask.device != device):
        devices = {t.device for t in (q_nope, q_rope, latent, k_rope, w_uk, w_uv)}
        if mask is not None:
            devices.add(mask.device)
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return Dims(B, H, S, T, r, dr, dn, uv[1], device)


def _raise_tensor_type(q_nope, q_rope, latent, k_rope, w_uk, w_uv) -> None:
    """check_args's type errors, for the first argument at fault."""
    for name, t in (("q_nope", q_nope), ("q_rope", q_rope), ("latent", latent), ("k_rope", k_rope),
                    ("w_uk", w_uk), ("w_uv", w_uv)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {t.dtype}")


def check_mask(mask, B, S: int, T: int) -> None:
    """The mask every form and latent MQA take: None, or a bool (True = attend) or additive float tensor
    that one [B, 1, S, T] view reads the same way in the kernels and in the references:

    * at most 4 dims;
    * no head axis: scores are [B, H, S, T], and torch (the references, HF's eager, SDPA) aligns a
      mask with them from the right, so dim -3 of a 3-D or 4-D mask is the head axis. It must be 1:
      a 3-D mask is [1, S, T] (a [B, S, T] mask would be read per head by torch), a 4-D one [B, 1, S, T];
    * it expands to [B, 1, S, T]: each size, aligned from the right, is its target's or 1 (a mask
      with a larger batch or query length would widen the references' output and crash the
      kernels' expand).

    The kernels read it through `absorbed_decode.mask_view` (leading 1s added, then expanded to
    [B, 1, S, T]), which these rules make the same reading as torch's broadcast."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a tensor or None, got {type(mask).__name__}")
    dtype = mask.dtype
    if dtype is not torch.bool and dtype not in _FLOAT_DTYPE_SET:
        raise TypeError(f"mask: expected bool (True = attend) or a float additive mask, got {dtype}")
    shape = mask.shape     # torch.Size; the messages print it as a tuple
    n = len(shape)
    if n > 4:
        raise ValueError(f"mask: shape {tuple(shape)} has {n} dims; expected at most 4, broadcastable to "
                         f"[B={B}, 1, S={S}, T={T}]")
    if n >= 3 and shape[-3] != 1:
        raise ValueError(f"mask: shape {tuple(shape)} has {shape[-3]} at dim {n - 3}, the head axis where torch "
                         f"aligns a mask with [B, H, S, T] scores; per-head masks are not supported: expected 1 "
                         f"there, [B={B}, 1, S={S}, T={T}], [1, S={S}, T={T}] or [S={S}, T={T}]")
    if not _expands_to(tuple(shape), (B, 1, S, T)):
        raise ValueError(f"mask: shape {tuple(shape)} does not broadcast to [B={B}, 1, S={S}, T={T}]")


def check_sinks(sinks, dims: Dims) -> None:
    """Attention sinks: None, or a floating [H] tensor on the others' device (one logit per head)."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks: expected a tensor or None, got {type(sinks).__name__}")
    if sinks.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sinks: expected a floating dtype {FLOAT_DTYPES}, got {sinks.dtype}")
    if tuple(sinks.shape) != (dims.heads,):
        raise ValueError(f"sinks: expected one logit per head, shape [H={dims.heads}], got {tuple(sinks.shape)}")
    if dims.device is not None and sinks.device != dims.device:
        raise ValueError(f"sinks: on {sinks.device}, the other tensors on {dims.device}")


def check_indices(topk_indices, dims: Dims) -> int:
    """int32/int64 [B, S, k], each in [-1, T): -1 means "no token". Returns k."""
    if not isinstance(topk_indices, torch.Tensor):
        raise TypeError(f"topk_indices: expected a tensor, got {type(topk_indices).__name__}")
    if topk_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_indices: expected int32 or int64, got {topk_indices.dtype}")
    if topk_indices.dim() != 3 or tuple(topk_indices.shape[:2]) != (dims.batch, dims.q_len):
        raise ValueError(f"topk_indices: expected [B={dims.batch}, S={dims.q_len}, k], got {tuple(topk_indices.shape)}")
    if topk_indices.shape[2] == 0:
        raise ValueError(f"topk_indices: k = 0 selected keys (shape {tuple(topk_indices.shape)})")
    if dims.device is not None and topk_indices.device != dims.device:
        raise ValueError(f"topk_indices: on {topk_indices.device}, the other tensors on {dims.device}")
    check_topk_range(topk_indices, dims.kv_len)
    return topk_indices.shape[2]


def check_topk_range(topk_indices: torch.Tensor, kv_len: int) -> None:
    """Every index in [-1, kv_len), else ValueError. The check reads the values: not while tracing
    (fake or functional tensors hold no data; a traced sparse op runs it through mla.checked_topk),
    nor while a CUDA graph is captured (no host reads; the eager warm-up calls before capture ran this
    check, and the kernel reads nothing outside [0, T))."""
    capturing = topk_indices.is_cuda and torch.cuda.is_current_stream_capturing()
    if topk_indices.numel() and not is_traced(topk_indices) and not capturing:
        lo, hi = int(topk_indices.min()), int(topk_indices.max())
        if lo < -1 or hi >= kv_len:
            raise ValueError(f"topk_indices: values must lie in [-1, T={kv_len}), got min {lo}, max {hi}")


def _expands_to(shape: tuple, to: tuple) -> bool:
    """Whether a tensor of `shape` expands to `to`: no more dims, and each size, aligned from the right,
    equal to its target or 1 (torch's broadcast rule, one way). Written out for plain sizes (it runs at
    every call, and torch.broadcast_shapes takes longer than the rest of the checks together); symbolic
    sizes (a traced call) go to torch, which compares them without adding guards, and a plain size
    against a plain target of 1 must be 1 itself."""
    if len(shape) > len(to):
        return False
    pairs = tuple(zip(shape[::-1], to[::-1]))
    for n, m in pairs:
        if type(n) is not int or type(m) is not int:
            break
        if n != m and n != 1:
            return False
    else:
        return True
    try:
        torch.broadcast_shapes(shape, to)
    except RuntimeError:
        return False
    return not any(type(n) is int and type(m) is int and m == 1 and n != 1 for n, m in pairs)


_TRACER_TENSORS = (FakeTensor, FunctionalTensor)


def is_traced(t: torch.Tensor) -> bool:
    """True for the stand-ins a tracer passes (fake, functional or meta tensors: no data to read)."""
    return isinstance(t, _TRACER_TENSORS) or t.device.type == "meta"



# Triton reads this when it decorates a kernel: the kernels of this process run on the CPU, in numpy.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class _Interpreted:
    """A kernel run by Triton's interpreter, indexed by its grid like the kernel. The kernels rely on
    IEEE float arithmetic overflowing to -inf (HF's finfo.min mask times log2(e), before exp2 takes it
    to 0), which the GPU does silently; numpy warns about each such overflow. The warning says
    nothing wrong, so it is silenced around the launch, and only there."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        import numpy as np

        def run(*args, **kwargs):
            with np.errstate(over="ignore"):
                return self.kernel[grid](*args, **kwargs)

        return run


def launcher(kernel, like: torch.Tensor):
    """`kernel` as launched for tensors like `like`, indexed with the grid: its traceable wrapper for a
    tracer's stand-in, the interpreter's run on the CPU, else the compiled binary called directly
    (`kernels.launch`: the JIT's per-call binding done once per specialisation)."""
    if is_traced(like):
        return torch.library.wrap_triton(kernel)
    if INTERPRETED:
        return _Interpreted(kernel)
    from mla_compile.kernels import launch   # imports Triton: not at import time (see kernels.registry)

    return launch.direct(kernel)
