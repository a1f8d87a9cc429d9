"""The cost of attention over one key/value head shared by every query head (latent MQA, DeepSeek-V4),
the way HF writes it and the way `mla.latent_mqa` runs it, on the same roofline as the MLA forms
(`work.py`'s counting rules; D is the head width, K = V):

* latent_mqa: the absorbed form's core when the device runs fused kernels (its split kernel and merge,
  two launches; else the reference's products, with its float32 scores materialised and walked like
  the MLA references'). FLOPs 4*B*H*L*D (Q K^T and P V over the live pairs L), the softmax's vector
  work, and bytes: Q and the output (B*H*S*D*e each), the head once per batch row (B*T*D*e), the mask
  (B*S*T*e) when one is read, once per row tile of (head, query) rows as `work.py` counts it.
* as_written: HF's `repeat_kv` copies the head to every query head, twice (K and V: B*T*D*e read,
  B*H*T*D*e written, each), then matmul, softmax and matmul as separate launches: K and V read per
  head, the float32 scores written and walked, the mask read.

The two do the same FLOPs; the difference is the H copies of the head, so latent MQA is never the
slower by this count, and the log shows by how much.

DeepSeek-V4's CSA layers (T = W window keys + C = T - W compressed entries, k picked per query) add a
third way, `gathered_costs`:

* latent_mqa_gathered: the DSA kernel over W + k positions a query: FLOPs 4*B*H*S*(W+k)*D, the window
  rows once (B*W*D*e), the picked rows at most once per sequence (B*min(S*k, C)*D*e, the queries of one
  sequence sharing them through L2), the window's mask (B*S*W*e), the picks read (B*S*k*8) and the
  per-query index list built and read (B*S*(W+k)*4, twice), the split merge (sinks).
* latent_mqa and as_written read HF's dense mask over all T keys and pay for building it: the -inf fill
  of [B, S, C+1], the scatter, the where()s over the picks and the cat with the window's mask
  (B*S*(C+1)*e + B*S*T*e written, B*S*T*e read).
"""

from __future__ import annotations

import sympy
import torch

from mla_compile.cost.devices import DeviceModel
from mla_compile.cost.roofline import element_bytes, kernel_time, roofline_time
from mla_compile.cost.symbols import SCORE_BYTES, B, H, S, T, e
from mla_compile.cost.work import ROW_TILE, SOFTMAX_OPS, SOFTMAX_PASSES_UNFUSED, live_pairs

SHARED_KV_FORMS = ("latent_mqa", "as_written")
GATHERED_FORMS = ("latent_mqa_gathered", "latent_mqa", "as_written")
D = sympy.Symbol("D", positive=True, integer=True)
W = sympy.Symbol("W", positive=True, integer=True)     # the window's keys (CSA)
K = sympy.Symbol("k", positive=True, integer=True)     # the entries picked per query (CSA)
INDEX_BYTES = 8                                         # HF's int64 picks; the kernel's index list is int32


def _kernels(form: str, fused: bool, mask: bool, causal: bool) -> list[tuple[str, sympy.Expr, sympy.Expr, sympy.Expr, int]]:
    """[(kernel, matmul FLOPs, vector FLOPs, bytes, launches)] of `form`."""
    L = live_pairs(causal, skip=fused)
    full = S * T
    mask_bytes = B * S * T * e if mask else 0
    qo = 2 * B * H * S * D * e
    if form == "latent_mqa":
        if fused:
            # the absorbed form's core (split + merge: two launches, as work.py counts it), whose
            # (head, query) row tiles each read their queries' mask rows
            reads = sympy.Min(H, sympy.Max(1, H * S / ROW_TILE))
            return [("attention", 4 * B * H * L * D, SOFTMAX_OPS * B * H * L,
                     qo + B * T * D * e + reads * mask_bytes, 2)]
        return [("attention", 4 * B * H * full * D, SOFTMAX_OPS * B * H * full,
                 qo + B * T * D * e + mask_bytes + SOFTMAX_PASSES_UNFUSED * B * H * full * SCORE_BYTES, 3)]
    copies = [("repeat_kv", 0, 0, 2 * (B * T * D * e + B * H * T * D * e), 2)]
    return copies + [
        ("scores", 2 * B * H * full * D, 0, B * H * S * D * e + B * H * T * D * e + B * H * full * SCORE_BYTES, 1),
        ("softmax", 0, SOFTMAX_OPS * B * H * full,
         mask_bytes + SOFTMAX_PASSES_UNFUSED * B * H * full * SCORE_BYTES, 4),
        ("p_v", 2 * B * H * full * D, 0, B * H * full * SCORE_BYTES + B * H * T * D * e + B * H * S * D * e, 1),
    ]


def shared_kv_time(form: str, device: DeviceModel, dtype: torch.dtype, *, mask: bool, causal: bool) -> sympy.Expr:
    """Predicted seconds of `form` in B, H, S, T, D on the roofline (`roofline.py`), each kernel at the
    absorbed form's attention efficiencies (latent MQA runs that kernel)."""
    if form not in SHARED_KV_FORMS:
        raise ValueError(f"unknown shared-head form {form!r}; expected one of {SHARED_KV_FORMS}")
    esz = element_bytes(dtype)
    rows = []
    for name, flops, vector, nbytes, launches in _kernels(form, device.fused_attention, mask, causal):
        nbytes = sympy.sympify(nbytes).subs(e, esz)
        rows.append((name, *kernel_time(device, dtype, "absorbed", "attention", flops, vector, nbytes, launches)))
    return roofline_time(rows, simplify=True)


def shared_kv_costs(sizes: dict, device: DeviceModel, dtype: torch.dtype, *, mask: bool, causal: bool) -> dict:
    """{form: (expression, seconds or None)} at `sizes` ({"B", "H", "S", "T", "D"}: ints, or anything
    else for a symbolic size, which leaves the expression unevaluated)."""
    symbols = {"B": B, "H": H, "S": S, "T": T, "D": D}
    values = {symbols[k]: v for k, v in sizes.items() if isinstance(v, int)}
    out = {}
    for form in SHARED_KV_FORMS:
        expr = shared_kv_time(form, device, dtype, mask=mask, causal=causal)
        at = expr.subs(values)
        out[form] = (expr, float(at) if at.is_number else None)
    return out


def _bias_build() -> tuple[str, sympy.Expr, sympy.Expr, sympy.Expr, int]:
    """HF's dense CSA mask: fill [B, 1, S, C+1] with -inf, scatter the picks, slice, cat after the window."""
    C = T - W
    nbytes = (B * S * (C + 1) * e + 3 * B * S * K * INDEX_BYTES      # fill; the picks' where()s
              + B * S * T * e + B * S * T * e)                       # the cat: both parts read, the whole written
    return ("topk_bias", 0, 0, nbytes, 4)


def _gathered_kernels(fused: bool) -> list[tuple[str, sympy.Expr, sympy.Expr, sympy.Expr, int]]:
    n = S * (W + K)
    qo = 2 * B * H * S * D * e
    rows = B * W * D * e + B * sympy.Min(S * K, T - W) * D * e
    index_list = ("index_list", 0, 0, B * S * K * INDEX_BYTES + B * S * (W + K) * 4, 3)
    if fused:
        return [index_list, ("attention", 4 * B * H * n * D, SOFTMAX_OPS * B * H * n,
                             qo + rows + B * S * W * e + B * S * (W + K) * 4, 2)]
    gathered = 2 * B * S * K * D * SCORE_BYTES
    return [("attention", 4 * B * H * n * D, SOFTMAX_OPS * B * H * n,
             qo + rows + gathered + B * S * W * e + SOFTMAX_PASSES_UNFUSED * B * H * n * SCORE_BYTES, 8)]


def gathered_time(form: str, device: DeviceModel, dtype: torch.dtype, *, causal: bool) -> sympy.Expr:
    """Predicted seconds of a CSA region's `form` in B, H, S, T, D, W, k (the dense ones under HF's mask,
    which they build)."""
    if form not in GATHERED_FORMS:
        raise ValueError(f"unknown CSA form {form!r}; expected one of {GATHERED_FORMS}")
    esz = element_bytes(dtype)
    if form == "latent_mqa_gathered":
        kernels = _gathered_kernels(device.fused_attention)
    else:
        kernels = _kernels(form, device.fused_attention, True, causal) + [_bias_build()]
    rows = []
    for name, flops, vector, nbytes, launches in kernels:
        nbytes = sympy.sympify(nbytes).subs(e, esz)
        rows.append((name, *kernel_time(device, dtype, "absorbed", "attention", flops, vector, nbytes, launches)))
    return roofline_time(rows, simplify=False)


def gathered_costs(sizes: dict, device: DeviceModel, dtype: torch.dtype, *, causal: bool = True) -> dict:
    """{form: (expression, seconds or None)} of a CSA region at `sizes` ({"B", "H", "S", "T", "D", "W",
    "k"}: ints, or anything else for a symbolic size)."""
    symbols = {"B": B, "H": H, "S": S, "T": T, "D": D, "W": W, "k": K}
    values = {symbols[k]: v for k, v in sizes.items() if isinstance(v, int) and k in symbols}
    out = {}
    for form in GATHERED_FORMS:
        expr = gathered_time(form, device, dtype, causal=causal)
        at = expr.subs(values)
        out[form] = (expr, float(at) if at.is_number else None)
    return out
