"""Quickstart: compile an unmodified HF MLA model with backend="mla", generate, read the log.

    python examples/quickstart.py                      # tiny DeepSeek-V3 from a config, CPU or GPU
    python examples/quickstart.py --family deepseek_v32 --tokens 16
    MLA_COMPILE_REMAINDER=eager python examples/quickstart.py   # skip Inductor for the rest of the graph

Nothing is downloaded: the model is built from a config with random weights.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mla_compile
from mla_compile.tiny import has_causal_lm, tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="deepseek_v3")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if not has_causal_lm(args.family):
        raise SystemExit(f"{args.family} has no CausalLM class in transformers: pick another family to generate")

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = tiny_model(args.family, dtype=dtype).to(args.device)
    fast = copy.deepcopy(model)
    # model.compile (in place) rather than torch.compile(model): generate() calls the module itself,
    # and only the in-place form routes those calls through the compiled graph.
    fast.compile(backend="mla")

    ids = torch.randint(3, model.config.vocab_size, (2, 8), device=args.device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                   # left padding on the first row
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False)
        t0 = time.perf_counter()
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False)
        seconds = time.perf_counter() - t0
    print(f"{args.family} on {args.device}: {args.tokens} tokens x 2 rows, first compiled generate "
          f"{seconds:.1f} s (includes compilation)")
    print("same greedy tokens as eager:", bool(torch.equal(got, want)))
    print()
    print(mla_compile.format_rewrite_log())
    if not torch.equal(got, want):
        raise SystemExit("mismatch against eager")


if __name__ == "__main__":
    main()
