"""StaticCache against DynamicCache in `model.generate`, HF eager and backend="mla" (issue 7, item 1).

    python benchmarks/cache_kinds.py [--points v3:8:4096,v3:1:16384] [--new 32] [--smoke]

For each point (model, batch B, prompt P) and system, `generate` runs twice after a warm-up call
(which compiles): with max_new_tokens=N and with max_new_tokens=1 (the prefill alone); the decode
time per step is (t_N - t_1) / (N - 1), so prefill is not in it. Static cache: cache_implementation=
"static" (max length P + N). Systems (--systems):
  eager        HF eager (sdpa), HF's own auto-compile turned off (disable_compile=True)
  hf-graphs    HF's default for a static cache on CUDA: generate compiles the decode steps itself
               (CompileConfig: Inductor, mode="reduce-overhead", CUDA graphs); prefill stays eager
  mla          model.compile(backend="mla"), no CUDA graphs, both cache kinds
  mla-graphs   the same automatic compile with CompileConfig(backend="mla", mode="reduce-overhead"):
               our backend on the decode steps, under CUDA graphs; the cache's tensors are created
               by the eager prefill, so HF marks them static addresses and cudagraph trees take the
               in-place cache writes without a copy
  model-graphs model.compile(backend="mla", mode="reduce-overhead") with a static cache: prefill
               is compiled too, the cache is created inside the traced prefill and never marked
               static (HF skips mark_static_address while tracing); kept as a probe of that path
  inductor-model-graphs  the same with backend="inductor": the peer of the probe above
(the graph systems run with the static cache only: a growing dynamic cache changes shapes every step).
Models as in generate.py (random bf16 weights, 2 layers). Greedy decoding; the tokens of every system
are compared with HF eager's.

Writes benchmarks/results/cache-kinds-<device>.md (and copies it to $OUT).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_forms import device_name, save_report  # noqa: E402
from generate import build, cudagraph_note, sync  # noqa: E402


def run_generate(model, ids, new, static, dev, compile_config=None):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids))
    if static:
        kw.update(cache_implementation="static")
        if compile_config is None:
            kw.update(disable_compile=True)
        else:
            kw.update(compile_config=compile_config)
    sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kw)
    sync(dev)
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="v3:8:4096,v3:1:16384")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--systems", default="eager,hf-graphs,mla,mla-graphs",
                    help="any of eager, hf-graphs, mla, mla-graphs, model-graphs, inductor-model-graphs")
    ap.add_argument("--tag", default="", help="suffix of the report's name")
    args = ap.parse_args()
    import mla_compile

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    points = [(m, int(b), int(p)) for m, b, p in (x.split(":") for x in args.points.split(","))]
    if args.smoke:
        points = [("v3", 2, 64)]
    N = args.new
    rows = []
    for name, B, P in points:
        fam, cfg, base = build(name, dev, dt, args.smoke)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, cfg.vocab_size, (B, P), generator=g).to(dev)
        want = {}
        # label, how it compiles (None: eager; "model": model.compile; "generate": generate's own
        # CompileConfig), backend, mode
        systems = {"eager": ("HF eager (sdpa)", None, None, None),
                   "hf-graphs": ("HF auto-compile (Inductor + CUDA graphs)", "generate", "inductor", "reduce-overhead"),
                   "mla": ("mla", "model", "mla", None),
                   "mla-graphs": ("mla + CUDA graphs (CompileConfig)", "generate", "mla", "reduce-overhead"),
                   "model-graphs": ("model.compile(mla, reduce-overhead)", "model", "mla", "reduce-overhead"),
                   "inductor-model-graphs": ("model.compile(inductor, reduce-overhead)", "model", "inductor",
                                             "reduce-overhead")}
        for label, how, backend, mode in (systems[x] for x in args.systems.split(",")):
            for static in (False, True):
                if mode == "reduce-overhead" and (not static or dev.type != "cuda"):
                    continue
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                mla_compile.reset()
                model, cc = base, None
                if how == "model":
                    model = copy.deepcopy(base)
                    model.compile(backend=backend, mode=mode)
                elif how == "generate":
                    from transformers import CompileConfig

                    cc = CompileConfig(backend=backend, mode=mode)
                try:
                    t_c0 = time.perf_counter()
                    run_generate(model, ids, N, static, dev, cc)          # warm-up: compiles
                    compile_s = time.perf_counter() - t_c0
                    t1, _ = run_generate(model, ids, 1, static, dev, cc)
                    tn, out = run_generate(model, ids, N, static, dev, cc)
                    step = (tn - t1) / (N - 1)
                    key = static
                    if how is None:
                        want[key] = out
                    same = None
                    if key in want:          # tokens equal to HF eager's; else the first new one that differs
                        diff = (out[:, P:] != want[key][:, P:]).any(0).nonzero()
                        same = "all" if diff.numel() == 0 else f"first {int(diff[0])} of {N}"
                    forms = sorted({r.form for r in mla_compile.rewrite_log() if r.status == "rewritten"})
                    rows.append(dict(model=name, B=B, P=P, system=label, cache="static" if static else "dynamic",
                                     step_ms=step * 1e3, prefill_ms=t1 * 1e3, tok_s=B / step, compile_s=compile_s,
                                     same=same, forms=",".join(forms) if backend == "mla" else "", note=cudagraph_note()))
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(model=name, B=B, P=P, system=label, cache="static" if static else "dynamic",
                                     step_ms=float("nan"), prefill_ms=float("nan"), tok_s=float("nan"),
                                     compile_s=float("nan"), same=None, forms="",
                                     note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                print(rows[-1], flush=True)
                del model
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del base

    lines = [f"# StaticCache vs DynamicCache in generate: {device_name(dev)}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- torch {torch.__version__}, transformers {__import__('transformers').__version__}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- decode step = (generate N={N} tokens - generate 1 token) / (N - 1); prefill = generate 1 token; "
             "greedy; 'same tokens': the new tokens equal HF eager's on the same cache kind ('all'), or how many "
             "agree before the first difference (bf16 with random weights: near-tied logits flip on rounding; "
             "exactness is tested in float32)", "",
             "| model | B | prompt | system | cache | decode step ms | tokens/s | prefill ms | compile s | "
             "same tokens | mla forms | note |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['B']} | {r['P']} | {r['system']} | {r['cache']} | {r['step_ms']:.3f} | "
                     f"{r['tok_s']:.0f} | {r['prefill_ms']:.1f} | {r['compile_s']:.1f} | {r['same']} | {r['forms']} | "
                     f"{r['note']} |")
    save_report("\n".join(lines) + "\n", f"cache-kinds-{device_name(dev)}{'-smoke' if args.smoke else ''}{args.tag}.md", (),
                os.environ.get("OUT"))


if __name__ == "__main__":
    main()
