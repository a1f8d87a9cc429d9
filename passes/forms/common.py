"""The reference math every form shares: masks, the float32 softmax. The argument contract (shapes,
dtypes, checks) is `mla_compile.kernels.common`'s, which the kernels share."""

from __future__ import annotations

import torch

from mla_compile.kernels.common import (  # noqa: F401  (the contract, re-exported for the forms)
    FLOAT_DTYPES, Dims, as_tokens, check_args, check_indices, check_sinks, check_topk_range, is_traced,
)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = attend) becomes 0 / -inf; a float mask is used as given (HF's eager adds it)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """torch SDPA's is_causal: query i sees key j iff j <= i (top-left aligned). [S, T] bool."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference computes in float32 for half types (float32 accumulation), else as given."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def softmax_rows(scores: torch.Tensor, sink: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim in float32 or wider; a row masked entirely to -inf gives zeros, not NaN
    (HF's additive masks use finfo.min, never -inf, so this only changes rows that would be NaN).
    sink: an attention sink's logit per row, broadcastable to scores[..., :1]: one more key in the
    normaliser, with a zero value, softmax([scores, sink])[..., :-1] as HF computes it."""
    scores = scores.to(compute_dtype(scores.dtype)) if scores.dtype != torch.float64 else scores
    m = scores.amax(-1, keepdim=True)
    if sink is not None:
        sink = sink.to(scores.dtype)
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    s = e.sum(-1, keepdim=True)
    if sink is not None:
        s = s + torch.exp(sink - m)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def head_sinks(sinks: torch.Tensor | None) -> torch.Tensor | None:
    """sinks [H] -> [1, H, 1, 1], the sink column of [B, H, S, T] scores (None stays None)."""
    return None if sinks is None else sinks.reshape(1, -1, 1, 1)
