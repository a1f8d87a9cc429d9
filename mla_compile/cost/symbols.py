"""The symbols of the cost model, one place for their names.

    B  batch                 S  query length (new tokens)      T  key length (cache incl. new tokens)
    H  heads                 r  latent rank (kv_lora_rank)     dr RoPE dim (qk_rope_head_dim, may be 0)
    dn no-RoPE dim           dv value dim                      k  DSA top-k
    e  bytes per element of the activations/weights (2 for bf16/fp16, 4 for fp32)

All are positive integers except dr (non-negative); sympy is told so, which keeps `solve` from
offering negative or complex sizes.  T >= S always: Hugging Face appends the new tokens to the cache
before attention, so the key length counts them.
"""

from __future__ import annotations

import sympy

B, S, T, H = sympy.symbols("B S T H", positive=True, integer=True)
r, dn, dv, k = sympy.symbols("r dn dv k", positive=True, integer=True)
dr = sympy.Symbol("dr", nonnegative=True, integer=True)
e = sympy.Symbol("e", positive=True)

SIZES = (B, S, T, H, r, dr, dn, dv, k)
ALL = SIZES + (e,)
BY_NAME = {str(s): s for s in ALL}

# plan() argument name -> symbol; also the aliases the runtime chooser accepts in its sizes dict.
ARG_TO_SYMBOL = {
    "batch": B, "q_len": S, "kv_len": T, "heads": H, "kv_lora_rank": r,
    "qk_rope_head_dim": dr, "qk_nope_head_dim": dn, "v_head_dim": dv, "topk": k,
}
SYMBOL_TO_ARG = {v: a for a, v in ARG_TO_SYMBOL.items()}

INDEX_BYTES = 4          # DSA top-k indices are int32
SCORE_BYTES = 4          # scores/probabilities materialised by the unfused (reference) path are float32


def resolve(name) -> sympy.Symbol:
    """'S', 'q_len' or the symbol itself -> the canonical symbol."""
    if isinstance(name, sympy.Symbol) and name in ALL:
        return name
    key = str(name)
    if key in BY_NAME:
        return BY_NAME[key]
    if key in ARG_TO_SYMBOL:
        return ARG_TO_SYMBOL[key]
    raise KeyError(f"unknown size {name!r}: expected one of {[str(s) for s in SIZES]} or {list(ARG_TO_SYMBOL)}")
