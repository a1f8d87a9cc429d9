"""Decode tokens/s and prefill time: HF eager (sdpa) vs torch.compile(Inductor) vs torch.compile(backend="mla").

    python benchmarks/generate.py [--budget 300] [--smoke] [--points v3:8:4096,v2lite:1:16384,...]

Models (random bf16 weights, built from config with mla_compile.tiny.tiny_config overrides, 2 layers,
both with the dense MLP (first_k_dense_replace = layers), vocab 1024, attn_implementation="sdpa"):
  v3      DeepSeek-V3 shapes: hidden 7168, 128 heads, q_lora 1536, kv_lora 512, dr 64, dn = dv = 128,
          dense MLP intermediate 18432 (V3's dense layers)
  v2lite  DeepSeek-V2-Lite shapes: hidden 2048, 16 heads, q_lora None, kv_lora 512, dr 64, dn = dv = 128,
          dense MLP intermediate 10944
  v32     DeepSeek-V3.2 (DSA) shapes: as v3 plus the indexer (64 heads x 128, index_topk 2048)
  v3attn  one V3 attention layer with its MLP shrunk to 64: the step is the attention module's (issue 4's
          "whole attention module step"), plus embedding, norms and a 7168 x 1024 lm_head (~15 MB, ~4 us)

Decode at context T: the DynamicCache is filled directly with random latents (and random indexer keys
for v32) of length T-1 (one 1-token forward initialises every cache layer, then each cached tensor is
replaced), and one decode step (1 new token per sequence, attending over T keys) is timed; before
each step the cache is put back to its T-1 tensors, so every step sees the same shapes. Those tensors
are marked static (torch._dynamo.mark_static_address), so that a CUDA-graph replay reads them in place
as it would a real loop's cache, instead of copying them first (see fill_cache; before 2026-11-22 the
Inductor and mla decode rows include that copy). tokens/s =
B / step time. Prefill: a 512-token prompt from an empty cache.

Systems: HF eager (the model as is, sdpa attention); Inductor = torch.compile(model, mode=
"reduce-overhead") (CUDA graphs); mla = torch.compile(model, backend="mla", mode="reduce-overhead")
(the backend hands the rest to Inductor with triton.cudagraphs). Decode uses those CUDA-graph modes;
prefill uses the same backends without CUDA graphs (mode default). Shapes are static (automatic
dynamic shapes off; every point compiles afresh; compile time is reported separately and not in any
timing). The sparse ops' index range check (a device->host sync, which CUDA-graph capture forbids) is
skipped by the op itself while a graph is captured (passes/forms/common.check_indices).

Writes one markdown table to $OUT and benchmarks/results/generate-<device>.md, and a CSV for plotting
(generate-<device>.csv); the rewrite log of the mla runs goes to generate-<device>-rewrites.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")
PROMPT = 512
FIELDS = ["model", "family", "H", "B", "T", "phase", "system", "cudagraphs", "ms", "tokens_per_s", "speedup_vs_eager",
          "speedup_vs_inductor", "compile_s", "forms", "note"]

# priority order: the targets first, then the rest as the budget allows
DEFAULT_POINTS = [("v3", 8, 4096), ("v32", 1, 65536), ("v3", 1, 4096), ("v2lite", 8, 4096), ("v3", 32, 4096),
                  ("v3", 8, 16384), ("v3", 1, 65536), ("v2lite", 1, 16384), ("v2lite", 32, 4096),
                  ("v2lite", 1, 65536), ("v3", 1, 16384), ("v32", 1, 16384), ("v2lite", 8, 16384)]


def model_config(name, smoke=False):
    from mla_compile.tiny import tiny_config

    if smoke:       # tiny sizes, same structure
        base = dict(heads=4, kv_lora_rank=32, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                    hidden_size=64, layers=2, vocab_size=128, index_topk=4, attn_implementation="sdpa",
                    first_k_dense_replace=2, max_position_embeddings=4096)
        if name == "v2lite":
            base["q_lora_rank"] = None
        fam = {"v3": "deepseek_v3", "v2lite": "deepseek_v2", "v32": "deepseek_v32"}[name]
        return fam, tiny_config(fam, **base)
    common = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, layers=2,
                  vocab_size=1024, attn_implementation="sdpa", first_k_dense_replace=2,
                  max_position_embeddings=163840, initializer_range=0.02)
    if name == "v3":
        return "deepseek_v3", tiny_config("deepseek_v3", heads=128, q_lora_rank=1536, hidden_size=7168,
                                          intermediate_size=18432, **common)
    if name == "v3attn":
        return "deepseek_v3", tiny_config("deepseek_v3", heads=128, q_lora_rank=1536, hidden_size=7168,
                                          intermediate_size=64, **{**common, "layers": 1, "first_k_dense_replace": 1})
    if name == "v32":
        return "deepseek_v32", tiny_config("deepseek_v32", heads=128, q_lora_rank=1536, hidden_size=7168,
                                           intermediate_size=18432, index_topk=2048, index_n_heads=64,
                                           index_head_dim=128, **common)
    if name == "v2lite":
        return "deepseek_v2", tiny_config("deepseek_v2", heads=16, q_lora_rank=None, hidden_size=2048,
                                          intermediate_size=10944, **common)
    raise ValueError(name)


def build(name, dev, dt, smoke):
    from transformers import AutoModelForCausalLM

    fam, cfg = model_config(name, smoke)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dt)
    model.eval()
    return fam, cfg, model


# ---------------------------------------------------------------------------------------------------
# cache filling

def cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError(f"{type(cache).__name__} has no .layers (transformers version?)")
    return layers


def fill_cache(model, B, T, dev, dt, static=True):
    """A cache holding T-1 random tokens per layer: run one token, then swap every cached tensor for a
    random one of length T-1 along its sequence dim (dim -2 of [B,1,t,d], dim 1 of [B,t,d]); static:
    mark those tensors' addresses static (below)."""
    ids = torch.ones(B, 1, dtype=torch.long, device=dev)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    g = torch.Generator(device=dev).manual_seed(1)
    saved = []
    for layer in cache_layers(cache):
        d = {}
        for attr, v in list(vars(layer).items()):
            if isinstance(v, torch.Tensor) and v.dim() >= 3 and v.is_floating_point():
                shape = list(v.shape)
                sd = v.dim() - 2 if v.dim() == 4 else 1
                shape[sd] = T - 1
                d[attr] = torch.randn(*shape, device=dev, dtype=v.dtype, generator=g)
        saved.append(d)
    # Marked static (as a real decode loop's cache is: HF marks a StaticCache's tensors itself, and a
    # DynamicCache's next step reads what the previous replay wrote, in the CUDA-graph tree's own pool).
    # Unmarked, the tree copies these tensors into its pool before every replay: 23 us a step for one V3
    # layer at B=8, T=4K, in Inductor's and mla's steps alike (module_step_host.py), a cost of this
    # harness that puts the same tensors back before each step, not of either system.
    for d in saved if static else ():
        for v in d.values():
            torch._dynamo.mark_static_address(v)
    restore(cache, saved)
    return cache, saved


def restore(cache, saved):
    for layer, d in zip(cache_layers(cache), saved):
        for attr, v in d.items():
            setattr(layer, attr, v)


# ---------------------------------------------------------------------------------------------------
# timing

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed_loop(step, dev, budget=0.5, min_n=3, max_n=50):
    """Mean seconds per step over back-to-back steps (CUDA events where available)."""
    step()
    sync(dev)
    t0 = time.perf_counter()
    step()
    sync(dev)
    est = time.perf_counter() - t0
    n = int(max(min_n, min(max_n, budget / max(est, 1e-6))))
    if dev.type == "cuda":
        from bench_forms import time_events

        return time_events(step, n)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def decode_step(fn, cache, saved, ids, mark):
    def step():
        restore(cache, saved)
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            out = fn(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits
    return step


def prefill_step(fn, ids):
    def step():
        with torch.no_grad():
            return fn(input_ids=ids, use_cache=True).logits
    return step


def cudagraph_note():
    """Inductor's count of graphs it ran without CUDA graphs (mutated inputs, CPU ops...), if any."""
    from torch._dynamo.utils import counters

    skips = dict(counters.get("inductor", {})).get("cudagraph_skips", 0)
    return f"cudagraph_skips={skips}" if skips else ""


def read_forms(log_path, start):
    forms = {}
    try:
        with open(log_path) as f:
            f.seek(start)
            for line in f:
                rec = json.loads(line)
                key = rec.get("form") if rec.get("status") == "rewritten" else f"skipped:{rec.get('reason', '')[:40]}"
                forms[key] = forms.get(key, 0) + 1
    except FileNotFoundError:
        pass
    return ",".join(f"{k}x{v}" for k, v in sorted(forms.items()))


def log_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all points (checked before each)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, any device")
    ap.add_argument("--points", help="model:B:T,... (default: the built-in priority list)")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the report's names (a run of a few points beside the main one)")
    args = ap.parse_args()
    t_start = time.time()
    import mla_compile  # noqa: F401  (registers backend="mla" in a bare checkout)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16
    cuda = dev.type == "cuda"
    dyn = torch._dynamo.config
    for k, v in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 512),
                 ("accumulated_cache_size_limit", 512), ("automatic_dynamic_shapes", False)):
        if hasattr(dyn, k):
            setattr(dyn, k, v)
    # No FX-graph / AOT cache hits: their keys leave out which inputs are static, so a graph compiled
    # before the cache was marked static (an earlier run on this machine) would come back and copy it.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    name = (torch.cuda.get_device_name().replace(" ", "-") if cuda else "cpu") + ("-smoke" if args.smoke else "") + args.tag
    os.makedirs(RESULTS, exist_ok=True)
    out_dir = os.environ.get("OUT")
    log_path = os.path.join(RESULTS, f"generate-{name}-rewrites.jsonl")
    if os.path.exists(log_path):
        os.remove(log_path)
    os.environ["MLA_COMPILE_LOG"] = log_path
    if args.points:
        points = [(m, int(b), int(t)) for m, b, t in (p.split(":") for p in args.points.split(","))]
    elif args.smoke:
        points = [("v3", 2, 64), ("v32", 1, 128), ("v2lite", 2, 64)]
    else:
        points = DEFAULT_POINTS
    ro = "reduce-overhead" if cuda else None
    inductor_backend = "inductor"
    if args.smoke and not cuda:
        inductor_backend = "aot_eager"             # CPU smoke: no C++ compile, plumbing only
        os.environ.setdefault("MLA_COMPILE_REMAINDER", "eager")
    systems = [("HF eager (sdpa)", None, None), ("Inductor", inductor_backend, ro), ("mla", "mla", ro)]

    models, rows, done_prefill, not_run = {}, [], set(), []
    csv_path = os.path.join(RESULTS, f"generate-{name}.csv")
    fcsv = open(csv_path, "w", newline="")
    w = csv.DictWriter(fcsv, FIELDS)
    w.writeheader()

    def emit(row):
        rows.append(row)
        w.writerow(row)
        fcsv.flush()
        print(f"[{time.time() - t_start:5.0f}s] " + " ".join(f"{k}={row[k]}" for k in
              ("model", "B", "T", "phase", "system", "ms", "tokens_per_s", "compile_s", "forms", "note")), flush=True)

    for pi, (mname, B, T) in enumerate(points):
        if time.time() - t_start > args.budget:
            not_run = points[pi:]
            break
        try:
            if mname not in models:
                models[mname] = build(mname, dev, dt, args.smoke)
            fam, cfg, model = models[mname]
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            emit(dict(model=mname, family="", H="", B=B, T=T, phase="build", system="", cudagraphs="", ms="",
                      tokens_per_s="", speedup_vs_eager="", speedup_vs_inductor="", compile_s="", forms="",
                      note=f"build failed: {type(e).__name__}: {str(e)[:150]}"))
            continue
        H = cfg.num_attention_heads
        phases = [("decode", T)]
        if not args.no_prefill and (mname, B) not in done_prefill and mname != "v32" and not args.smoke:
            phases.append(("prefill", PROMPT))
            done_prefill.add((mname, B))
        elif args.smoke and (mname, B) not in done_prefill:
            phases.append(("prefill", 16))
            done_prefill.add((mname, B))
        for phase, L in phases:
            base = {}
            for sysname, backend, mode in systems:
                row = dict(model=mname, family=fam, H=H, B=B, T=L if phase == "decode" else "", phase=phase,
                           system=sysname, cudagraphs="", ms="", tokens_per_s="", speedup_vs_eager="",
                           speedup_vs_inductor="", compile_s="", forms="", note="")
                if phase == "prefill":
                    row["T"] = L
                try:
                    torch._dynamo.reset()
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
                    m = mode if phase == "decode" else None
                    row["cudagraphs"] = "yes" if m == "reduce-overhead" else "no"
                    if backend is None:
                        fn = model
                    else:
                        fn = torch.compile(model, backend=backend, mode=m)
                    start = log_size(log_path)
                    if phase == "decode":
                        cache, saved = fill_cache(model, B, L, dev, dt)
                        ids = torch.ones(B, 1, dtype=torch.long, device=dev)
                        step = decode_step(fn, cache, saved, ids, mark=(m == "reduce-overhead"))
                    else:
                        ids = torch.randint(3, cfg.vocab_size, (B, L), device=dev)
                        step = prefill_step(fn, ids)
                    t0 = time.perf_counter()
                    for _ in range(3 if backend else 1):      # compile; cudagraph warm-up and recording
                        step()
                    sync(dev)
                    if backend:
                        row["compile_s"] = round(time.perf_counter() - t0, 1)
                    if backend == "mla":
                        row["forms"] = read_forms(log_path, start)
                    t = timed_loop(step, dev, budget=0.4 if phase == "decode" else 0.6)
                    row["ms"] = round(t * 1e3, 4)
                    if phase == "decode":
                        row["tokens_per_s"] = round(B / t, 1)
                    base[sysname] = t
                    if "HF eager (sdpa)" in base and sysname != "HF eager (sdpa)":
                        row["speedup_vs_eager"] = round(base["HF eager (sdpa)"] / t, 2)
                    if "Inductor" in base and sysname == "mla":
                        row["speedup_vs_inductor"] = round(base["Inductor"] / t, 2)
                    if backend and cuda and m:
                        row["note"] = cudagraph_note()
                except torch.OutOfMemoryError as e:
                    row["note"] = f"OOM: {str(e)[:80]}"
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
                finally:
                    fn = step = cache = saved = None  # noqa: F841
                    if cuda:
                        torch.cuda.synchronize()
                emit(row)
        torch._dynamo.reset()
    fcsv.close()
    torch._dynamo.reset()

    # ---- the table
    import transformers
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "n/a"
    lines = [f"# Decode and prefill: HF eager vs Inductor vs mla, {name}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}, triton {tv}, "
             f"transformers {transformers.__version__}, CUDA {torch.version.cuda}",
             f"- command: `python {' '.join(sys.argv)}`",
             "- models: 2 layers, dense MLP, vocab 1024, random bf16 weights, attn_implementation=sdpa; v3 = "
             "DeepSeek-V3 shapes (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, dr 64, dn=dv=128, MLP 18432); "
             "v2lite = V2-Lite shapes (hidden 2048, 16 heads, no q_lora, MLP 10944); v32 = V3.2 shapes + DSA "
             "indexer (64x128, top-k 2048)",
             "- decode: one step (1 token per sequence) over a DynamicCache filled directly with T-1 random "
             "latents (context T includes the new token), its tensors marked static (read in place by a CUDA-graph "
             "replay, not copied first: see fill_cache); tokens/s = B / step time; CUDA graphs "
             "(mode=\"reduce-overhead\") for Inductor and mla decode, none for HF eager; prefill: "
             f"{PROMPT}-token prompt, empty cache, no CUDA graphs for any system",
             "- times: CUDA events around back-to-back steps (mean), after 3 warm-up calls; compile time excluded",
             ""]
    lines += ["| model | H | B | phase | T | system | CUDA graphs | ms | tokens/s | x eager | x Inductor | "
              "compile s | mla forms | note |", "|" + "---|" * 14]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for k in ("model", "H", "B", "phase", "T", "system", "cudagraphs",
                                                             "ms", "tokens_per_s", "speedup_vs_eager",
                                                             "speedup_vs_inductor", "compile_s", "forms", "note"))
                     + " |")
    if not_run:
        lines += ["", "not run (time budget): " + ", ".join(f"{m} B={b} T={t}" for m, b, t in not_run)]
    from bench_forms import save_report

    save_report("\n".join(lines) + "\n", f"generate-{name}.md",
                (f"generate-{name}.csv", f"generate-{name}-rewrites.jsonl"), out_dir)


if __name__ == "__main__":
    main()
