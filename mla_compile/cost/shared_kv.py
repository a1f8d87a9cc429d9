"""The cost of attention over one key/value head shared by every query head (latent MQA, DeepSeek-V4),
the way HF writes it and the way `mla.latent_mqa` runs it, on the same roofline as the MLA forms
(`work.py`'s counting rules; D is the head width, K = V):

* latent_mqa: one kernel when the device runs fused kernels (else the reference's products, with its
  float32 scores materialised and walked like the MLA references'). FLOPs 4*B*H*L*D (Q K^T and P V
  over the live pairs L), the softmax's vector work, and bytes: Q and the output (B*H*S*D*e each),
  the head once per batch row (B*T*D*e), the mask (B*S*T*e) when one is read.
* as_written: HF's `repeat_kv` copies the head to every query head, twice (K and V: B*T*D*e read,
  B*H*T*D*e written, each), then matmul, softmax and matmul as separate launches: K and V read per
  head, the float32 scores written and walked, the mask read.

The two do the same FLOPs; the difference is the H copies of the head, so latent MQA is never the
slower by this count, and the log shows by how much.
"""

from __future__ import annotations

import sympy
import torch

from mla_compile.cost.devices import DeviceModel
from mla_compile.cost.roofline import element_bytes, kernel_time, roofline_time
from mla_compile.cost.symbols import SCORE_BYTES, B, H, S, T, e
from mla_compile.cost.work import SOFTMAX_OPS, SOFTMAX_PASSES_UNFUSED, live_pairs

SHARED_KV_FORMS = ("latent_mqa", "as_written")
D = sympy.Symbol("D", positive=True, integer=True)


def _kernels(form: str, fused: bool, mask: bool, causal: bool) -> list[tuple[str, sympy.Expr, sympy.Expr, sympy.Expr, int]]:
    """[(kernel, matmul FLOPs, vector FLOPs, bytes, launches)] of `form`."""
    L = live_pairs(causal, skip=fused)
    full = S * T
    mask_bytes = B * S * T * e if mask else 0
    qo = 2 * B * H * S * D * e
    if form == "latent_mqa":
        if fused:
            return [("attention", 4 * B * H * L * D, SOFTMAX_OPS * B * H * L, qo + B * T * D * e + mask_bytes, 1)]
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
