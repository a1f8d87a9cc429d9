"""End to end: `model.generate()` as a user calls it, system by system, on published model configs.

    python benchmarks/e2e.py [--models v2-lite,v3] [--systems hf-eager,mla] [--batch 1,8,32]
                             [--prompt 2048,16384,65536] [--new-tokens 64] [--layers N] [--dtype bf16]
                             [--host-profile STEPS] [--kernel-table N] [--assist N] [--out DIR] [--tag=-suffix]
    python benchmarks/e2e.py --smoke [--out DIR]    # CPU: a tiny DeepSeek-V3, hf-eager and both mla recipes, float32

One process, one GPU. Systems, run in this order (hf-eager first: it is the reference of the checks):

  hf-eager    HF as is: attn_implementation="sdpa", DynamicCache, no compile
  hf-static   generate(..., cache_implementation="static"): HF compiles the decode step itself
              (its default CompileConfig: Inductor, mode="reduce-overhead", CUDA graphs)
  inductor    model.compile() (Inductor), DynamicCache
  mla-static  mla_compile.compile_generate(model): generate's StaticCache, its decode step compiled
              with CompileConfig(backend="mla", mode="reduce-overhead") (CUDA graphs)
  mla         model.compile(backend="mla"), DynamicCache: the one-liner of the README

Models (--models; random weights, no download): the fields of each published config.json are in
MODELS below. DeepSeek-V3 and V3.2 run at their real widths with as many layers as fit in 40% of the
GPU's memory, between 2 and 4 (their first three layers are dense; a fourth brings one MoE layer);
the others with their published layer count. --layers N sets the count for every model.

--assist N runs every system with assisted generation, generate(prompt_lookup_num_tokens=N): each
forward verifies a block of up to N draft tokens. Its rows hold decode ms/token (as below), first
call s, peak GiB and the tokens against hf-eager's assisted generation; the static systems get a
cache N tokens longer (HF's StaticCache has no room for a last draft block otherwise).

Per row (model, batch B, prompt length P, system), greedy, --new-tokens N tokens:
  decode ms/token  (wall time of generate() with N new tokens - with 1) / (N - 1), each the faster of
                   two calls made as a user makes them (nothing of ours in the loop); tokens/s = B / that
  synced step ms   the median gap between consecutive tokens, from a LogitsProcessor that
                   synchronizes and takes a timestamp at every step: the step's GPU work and host work
                   one after the other (transformers' deferred stop check otherwise overlaps the host
                   work of a step with the GPU work of the previous one)
  prefill ms       time to the first token (input preparation, prefill forward, first logits)
  first call s     the first generate() of the row, compilation included: every row starts from a fresh
                   compile (torch._dynamo.reset()), as a process serving those shapes would, so no row
                   runs graphs made dynamic by an earlier row's shapes (Inductor's on-disk caches may
                   shorten it on a machine that compiled the same graphs before)
  of which our passes s, Inductor compile s
                   the mla systems' first call: the seconds in our passes (matching, cost model, rewrite)
                   and in Inductor's compile of the rewritten graphs (`mla_compile.compile_times()`); the
                   rest of the first call is Dynamo's tracing, the first run's Triton compiles and
                   autotuning, CUDA-graph recording and the run itself
  peak GiB         torch.cuda.max_memory_allocated over the row's calls
  GPU ms/step      torch.profiler (CUDA activity only) over --profile-steps decode steps of a third
                   call: the summed duration of kernels, copies and memsets per step
  wall ms/step     the wall time of those profiled steps per step (profiler overhead included)
  floor ms         bytes a decode step must read / the GPU's copy rate (a 1 GiB device-to-device copy,
                   bytes read + written per second, measured once): every weight once, except the
                   routed experts of MoE layers (of E experts, min(E, B * top_k) per layer: the union
                   of the batch's picks, bounded by E) and the embedding table (B rows, unless tied to
                   the lm_head); plus the latent cache (B * T * (kv_lora_rank + qk_rope_head_dim) per
                   layer; DSA models: the indexer's key cache over T plus min(T, index_topk) latent
                   rows) at the mean context T = P + N/2
  attention share  the fraction of the profiled GPU time in kernels whose lower-cased names contain one
                   of ATTENTION_KERNEL_WORDS: our kernels' names, "mla", "attention", "flash", "sdpa",
                   "fmha". HF's per-step expansion of the latent (a cuBLAS GEMM) and an SDPA that falls
                   back to its math path (bmm + softmax) are not counted.
  logits check     against hf-eager's logits at the same row, as max |difference| / max |hf-eager
                   logit|, pass when both are within LOGITS_TOL (bf16/fp16 2e-2, float32 1e-4):
                   prefill: the first token's logits (they depend on the prompt alone);
                   decode: the second token's, over the sequences whose first token equals
                   hf-eager's (elsewhere the step's input differs, and so do its logits: a compiled
                   prefill may round a near tie of random weights the other way in bf16); "-" when
                   no sequence's first token agrees
  tokens = hf-eager  the fraction of generated tokens equal to hf-eager's (reported, not asserted:
                   random weights give near-tied logits, and bf16 rounding flips them)
  mla forms        the forms the backend chose (its rewrite log), for the mla systems

A row that runs out of memory is recorded as OOM, and larger rows of that system at that batch are
skipped. Writes e2e-<device><tag>.md and .csv to --out (else $OUT, else benchmarks/results/) and, when
matplotlib is present, e2e-<device><tag>.png: decode ms/token against prompt length, one line per
system, one panel per model and batch (plot.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass

import torch

import common

SYSTEMS = ("hf-eager", "hf-static", "inductor", "mla-static", "mla")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOGITS_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
# our kernels (mla_compile.kernels: absorbed, sparse and expanded attention, split merge, head projection)
OUR_KERNELS = ("split_kernel", "merge_splits", "expanded_fwd", "block_flags", "block_list", "per_head_matmul")
ATTENTION_KERNEL_WORDS = OUR_KERNELS + ("mla", "attention", "flash", "sdpa", "fmha")
SMOKE_OPTIONS = {"remainder": "eager"}


@dataclass
class Published:
    name: str
    config: dict            # fields of the published config.json (model_type included)
    auto_layers: bool = False


# The fields of each published config.json that shape the model, as they appear there (the rest take
# the transformers config class's defaults). Left out: MiniCPM3-4B's longrope rope_scaling (per-dimension
# factor lists: it changes the rotary frequencies, not the shapes or the work of a step), and its
# tie_word_embeddings, which takes the class's default (True) unchecked against the published file.
V3 = json.loads("""{
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128,
    "vocab_size": 129280}""")
MODELS = {
    "v2-lite": Published("DeepSeek-V2-Lite", json.loads("""{
        "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_size": 2048,
        "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
        "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": null,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
        "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
        "vocab_size": 102400}""")),
    "minicpm3": Published("MiniCPM3-4B", json.loads("""{
        "bos_token_id": 1, "dim_model_base": 256, "eos_token_id": 2, "hidden_size": 2560,
        "initializer_range": 0.1, "intermediate_size": 6400, "kv_lora_rank": 256,
        "max_position_embeddings": 32768, "model_type": "minicpm3", "num_attention_heads": 40,
        "num_hidden_layers": 62, "num_key_value_heads": 40, "q_lora_rank": 768, "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32, "rms_norm_eps": 1e-05, "rope_theta": 10000, "scale_depth": 1.4,
        "scale_emb": 12, "v_head_dim": 64, "vocab_size": 73448}""")),
    "glm-4.7-flash": Published("GLM-4.7-Flash", json.loads("""{
        "first_k_dense_replace": 1, "hidden_size": 2048, "intermediate_size": 10240, "kv_lora_rank": 512,
        "max_position_embeddings": 202752, "model_type": "glm4_moe_lite", "moe_intermediate_size": 1536,
        "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 1, "norm_topk_prob": true,
        "num_attention_heads": 20, "num_experts_per_tok": 4, "num_hidden_layers": 47,
        "num_key_value_heads": 20, "partial_rotary_factor": 1.0, "q_lora_rank": 768, "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 1000000, "routed_scaling_factor": 1.8,
        "tie_word_embeddings": false, "topk_group": 1, "topk_method": "noaux_tc", "v_head_dim": 256,
        "vocab_size": 154880}""")),
    # DeepSeek-V3's architecture: its config.json differs from V3's in these fields
    "moonlight": Published("Moonlight-16B-A3B", dict(V3, **json.loads("""{
        "num_hidden_layers": 27, "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16,
        "q_lora_rank": null, "intermediate_size": 11264, "moe_intermediate_size": 1408, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 2.446, "max_position_embeddings": 8192, "rope_theta": 50000.0,
        "rope_scaling": null, "rms_norm_eps": 1e-05, "vocab_size": 163840, "bos_token_id": 163584,
        "eos_token_id": 163586}"""))),
    "v3": Published("DeepSeek-V3", V3, auto_layers=True),
    "v3.2": Published("DeepSeek-V3.2", dict(V3, model_type="deepseek_v32", index_head_dim=128, index_n_heads=64,
                                            index_topk=2048), auto_layers=True),
}


# ---------------------------------------------------------------------------------------------------
# models

def model_config(key: str, layers: int | None):
    from transformers import AutoConfig

    fields = dict(MODELS[key].config)
    model_type = fields.pop("model_type")
    if layers:
        fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(model_type, **fields)


def weight_bytes_of(cfg, dtype) -> int:
    """Bytes of the weights of a model built from `cfg` (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in m.parameters())


def layers_that_fit(key: str, dtype, device, share: float = 0.4) -> int:
    budget = share * torch.cuda.get_device_properties(device).total_memory
    for n in (4, 3):
        if weight_bytes_of(model_config(key, n), dtype) <= budget:
            return n
    return 2


def quiet_generation_config(model) -> None:
    """No stopping on EOS (every row generates exactly --new-tokens tokens), no sampling."""
    model.generation_config.eos_token_id = None
    model.generation_config.do_sample = False


def build(key: str, layers: int | None, dtype, device):
    from transformers import AutoModelForCausalLM

    if layers is None and MODELS[key].auto_layers:
        layers = layers_that_fit(key, dtype, device)
    cfg = model_config(key, layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model.eval()
    quiet_generation_config(model)
    return model


def build_smoke(dtype):
    from mla_compile.tiny import tiny_model

    model = tiny_model("deepseek_v3", layers=2, attn_implementation="sdpa", dtype=dtype)
    quiet_generation_config(model)
    return model


# ---------------------------------------------------------------------------------------------------
# the bytes floor

@dataclass
class StepBytes:
    dense: int              # weights every step reads whole
    experts: int            # routed experts' weights, all of them
    n_experts: int
    top_k: int
    embed_row: int          # bytes of one embedding row (0 when the table is tied to the lm_head)
    cache_token: int        # latent cache bytes per token, all layers
    index_token: int        # DSA: indexer key bytes per token, all layers (0 elsewhere)
    topk: int               # DSA: latent rows read per query (0 elsewhere)

    def at(self, B: int, T: float) -> float:
        experts = self.experts * min(self.n_experts, B * self.top_k) / self.n_experts if self.n_experts else 0
        cache = B * (T * self.index_token + min(T, self.topk) * self.cache_token) if self.topk \
            else B * T * self.cache_token
        return self.dense + experts + B * self.embed_row + cache


def step_bytes(model) -> StepBytes:
    cfg = model.config
    E = getattr(cfg, "n_routed_experts", None) or 0
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    dense = experts = embed_row = 0
    for name, p in model.named_parameters():
        nb = p.numel() * p.element_size()
        if E and ".experts." in name and p.dim() >= 3 and p.shape[0] == E:
            experts += nb
        elif p is emb and not tied:
            embed_row = p.shape[1] * p.element_size()
        else:
            dense += nb
    e = emb.element_size()
    layers = cfg.num_hidden_layers
    topk = getattr(cfg, "index_topk", None) or 0
    return StepBytes(dense=dense, experts=experts, n_experts=E, top_k=getattr(cfg, "num_experts_per_tok", 0) or 0,
                     embed_row=embed_row, cache_token=layers * e * (cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                     index_token=layers * e * getattr(cfg, "index_head_dim", 0) if topk else 0, topk=topk)


# ---------------------------------------------------------------------------------------------------
# systems

def release(model, device) -> None:
    """Undo every system's compilation and cached state on `model`."""
    model._compiled_call_impl = None
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length", "_cache"):
        model.__dict__.pop(attr, None)
    model.generation_config.cache_implementation = None
    model.generation_config.compile_config = None
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare(model, system: str, device, smoke: bool) -> None:
    import mla_compile

    release(model, device)
    mla_compile.reset()
    if system == "inductor":
        model.compile()
    elif system == "mla":
        model.compile(backend="mla", **({"options": SMOKE_OPTIONS} if smoke else {}))
    elif system == "mla-static":
        mla_compile.compile_generate(model, **({"options": SMOKE_OPTIONS} if smoke else {}))


def generate_kwargs(system: str, new_tokens: int, assist: int = 0, prompt: int = 0) -> dict:
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    if system == "hf-static":
        kw["cache_implementation"] = "static"
    if assist:
        kw["prompt_lookup_num_tokens"] = assist
        if system in ("hf-static", "mla-static"):
            # a StaticCache sized for prompt + new tokens has no room for the last draft block
            kw["max_cache_len"] = prompt + new_tokens + assist
    return kw


def forms_chosen() -> str:
    import mla_compile

    recs = mla_compile.rewrite_log()
    c = Counter(r.form if r.status == "rewritten" else "left alone" for r in recs)
    return ", ".join(f"{f} x{n}" for f, n in sorted(c.items()))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------------------------------------------
# one row

class StepClock:
    """A LogitsProcessor: synchronizes and takes a timestamp at every step; keeps the logits of the
    prefill and of the first decode step (the first two calls); calls `on_step(i)` if given."""

    def __init__(self, device, on_step=None):
        self.device, self.on_step = device, on_step
        self.times: list[float] = []
        self.logits: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        common.sync(self.device)
        self.times.append(time.perf_counter())
        if len(self.logits) < 2:
            self.logits.append(scores.detach().float().cpu())
        if self.on_step is not None:
            self.on_step(len(self.times) - 1)
        return scores


def plain_generate_seconds(model, ids, kw, device) -> float:
    """Wall seconds of one generate() call as a user makes it: no logits processor of ours, nothing
    synchronized between steps (transformers' deferred stop check lets the host queue a step while
    the GPU runs the previous one)."""
    common.sync(device)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    common.sync(device)
    return time.perf_counter() - t0


def timed_generate(model, ids, kw, device, on_step=None):
    from transformers import LogitsProcessorList

    clock = StepClock(device, on_step)
    common.sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([clock]),
                         **kw)
    common.sync(device)
    return out, clock, t0


def profile_decode(model, ids, kw, device, steps: int, top: int = 0):
    """(GPU ms per step, wall ms per step, attention share, kernel table) over `steps` decode steps of
    one call; the table (top > 0) lists the `top` kernels by GPU time per step, with their share."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA])
    first = 2
    marks = {}

    def on_step(i):
        if i == first:
            prof.start()
            marks["a"] = time.perf_counter()
        elif i == first + steps:
            marks["b"] = time.perf_counter()
            prof.stop()

    timed_generate(model, ids, kw, device, on_step)
    if "b" not in marks:          # fewer steps than asked for
        prof.stop()
        return None, None, None, ""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    dev = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    total = sum(e["dur"] for e in dev)
    attn = sum(e["dur"] for e in dev if e.get("cat") == "kernel"
               and any(w in e.get("name", "").lower() for w in ATTENTION_KERNEL_WORDS))
    if not total:                 # the profiler saw no kernels (CUDA-graph replays untraced)
        return None, (marks["b"] - marks["a"]) * 1e3 / steps, None, ""
    return (total / 1e3 / steps, (marks["b"] - marks["a"]) * 1e3 / steps, attn / total,
            kernel_table(dev, steps, top) if top else "")


def kernel_table(events, steps: int, top: int) -> str:
    """The `top` kernels (and copies) by GPU time per decode step: us per step, calls per step, share."""
    by_name: dict[str, list] = {}
    for e in events:
        t = by_name.setdefault(e.get("name", "?"), [0.0, 0])
        t[0] += e["dur"]
        t[1] += 1
    total = sum(t for t, _ in by_name.values())
    lines = [f"GPU time per decode step: {total / steps:.1f} us over {len(by_name)} distinct kernels",
             f"{'us/step':>9} {'calls/step':>10} {'share':>6}  kernel"]
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{t / steps:9.1f} {n / steps:10.1f} {100 * t / total:5.1f}%  {name[:160]}")
    return "\n".join(lines) + "\n"


def host_profile(model, ids, kw, device, steps: int, top: int = 40) -> str:
    """Where the host time of `steps` decode steps of one call goes: cProfile's table (cumulative
    time, then own time) over those steps. cProfile slows Python down, so its times overstate the
    Python share; the table is for finding where the time goes, not for its size."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    first = 2

    def on_step(i):
        if i == first:
            prof.enable()
        elif i == first + steps:
            prof.disable()

    timed_generate(model, ids, kw, device, on_step)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def prompt_ids(vocab: int, B: int, P: int, device):
    g = torch.Generator().manual_seed(1000 * B + P)
    return torch.randint(3, vocab, (B, P), generator=g).to(device)


def run_row(model, system, B, P, args, device, ref, floor):
    """Fill one row's measurements (dict), comparing with `ref` = hf-eager's (tokens, logits) if given."""
    kw = generate_kwargs(system, args.new_tokens, args.assist, P)
    ids = prompt_ids(model.config.vocab_size, B, P, device)
    row = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.__dict__.pop("_previous_max_cache_length", None)     # a static cache sized for this row
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    common.sync(device)
    row["first_call_s"] = round(time.perf_counter() - t0, 2)
    row.update(compile_split(system))
    if args.assist:
        return assisted_row(model, system, ids, kw, args, device, ref, row)
    out, clock, t0 = timed_generate(model, ids, kw, device)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    row["synced_step_ms"] = round(statistics.median(gaps) * 1e3, 4)
    whole = min(plain_generate_seconds(model, ids, kw, device) for _ in range(2))
    first = min(plain_generate_seconds(model, ids, dict(kw, max_new_tokens=1), device) for _ in range(2))
    decode = (whole - first) / (args.new_tokens - 1)
    if decode > 0:            # else the steps are below the timing noise (tiny models on the CPU)
        row["decode_ms"] = round(decode * 1e3, 4)
        row["tok_s"] = round(B / decode, 1)
    row["prefill_ms"] = round((clock.times[0] - t0) * 1e3, 2)
    if cuda and args.profile_steps:
        gpu, wall, share, table = profile_decode(model, ids, kw, device, args.profile_steps, args.kernel_table)
        if table:
            name = f"e2e-kernels-{system}-{model.config.model_type}-B{B}-P{P}{args.tag}.txt"
            with open(os.path.join(common.out_dir(args.out), name), "w") as f:
                f.write(table)
        row.update(gpu_ms=None if gpu is None else round(gpu, 4), wall_ms=None if wall is None else round(wall, 4),
                   attn_share=None if share is None else f"{100 * share:.0f}%")
    if cuda and args.host_profile:
        name = f"e2e-host-{system}-{model.config.model_type}-B{B}-P{P}{args.tag}.txt"
        with open(os.path.join(common.out_dir(args.out), name), "w") as f:
            f.write(host_profile(model, ids, kw, device, args.host_profile))
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    if floor is not None and row.get("decode_ms"):
        fl = floor.at(B, P + args.new_tokens / 2) / args.copy_rate * 1e3
        row.update(floor_ms=round(fl, 4), floor_pct=f"{100 * fl / row['decode_ms']:.0f}%")
    tokens = out[:, P:].cpu()
    if ref is None:
        row["logits_ok"] = "reference" if system == "hf-eager" else None
        return row, (tokens, clock.logits)
    ref_tokens, ref_logits = ref
    diffs = [relative_max_diff(clock.logits[0], ref_logits[0])]
    same_start = tokens[:, 0] == ref_tokens[:, 0]
    if same_start.any():
        diffs.append(relative_max_diff(clock.logits[1][same_start], ref_logits[1][same_start]))
        row["decode_logits_diff"] = f"{diffs[1]:.1e} ({int(same_start.sum())}/{B})"
    row["prefill_logits_diff"] = f"{diffs[0]:.1e}"
    row["logits_ok"] = "pass" if max(diffs) <= LOGITS_TOL[args.dtype] else "fail"
    row["token_agreement"] = round((tokens == ref_tokens).float().mean().item(), 4)
    return row, None


def compile_split(system: str) -> dict:
    """For the mla systems: the first call's seconds in our passes and in Inductor's compile of the
    rewritten graphs (`mla_compile.compile_times()`, reset when the row starts); the rest of the first
    call is Dynamo's tracing, the first run's Triton compiles and autotuning, and CUDA-graph recording."""
    import mla_compile

    times = mla_compile.compile_times() if system.startswith("mla") else []
    if not times:
        return {}
    split = {"passes_s": round(sum(t.match_s + t.decide_s + t.rewrite_s for t in times), 2)}
    inductor = [t.inductor_s for t in times if t.inductor_s is not None]
    if inductor:
        split["inductor_s"] = round(sum(inductor), 2)
    return split


def assisted_row(model, system, ids, kw, args, device, ref, row):
    """--assist: ms per generated token over whole generate() calls and the tokens against hf-eager's
    assisted generation (a draft block is verified per forward, so there is no per-step clock, logits
    check or profile)."""
    whole = min(plain_generate_seconds(model, ids, kw, device) for _ in range(2))
    first = min(plain_generate_seconds(model, ids, dict(kw, max_new_tokens=1), device) for _ in range(2))
    decode = (whole - first) / (args.new_tokens - 1)
    if decode > 0:
        row["decode_ms"] = round(decode * 1e3, 4)
        row["tok_s"] = round(ids.shape[0] / decode, 1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[:, ids.shape[1]:].cpu()
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    if ref is None:
        row["logits_ok"] = "reference" if system == "hf-eager" else None
        return row, (out, None)
    same = out.shape == ref[0].shape
    row["token_agreement"] = round((out == ref[0]).float().mean().item(), 4) if same else 0.0
    return row, None


def relative_max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# ---------------------------------------------------------------------------------------------------

COLUMNS = [("model", "model"), ("layers", "layers"), ("batch", "B"), ("prompt", "prompt"), ("system", "system"),
           ("decode_ms", "decode ms/token"), ("synced_step_ms", "synced step ms"), ("tok_s", "tokens/s"),
           ("x_eager", "x hf-eager"),
           ("prefill_ms", "prefill ms"), ("first_call_s", "first call s"), ("passes_s", "of which our passes s"),
           ("inductor_s", "of which Inductor compile s"), ("peak_gib", "peak GiB"),
           ("gpu_ms", "GPU ms/step"), ("wall_ms", "wall ms/step (profiled)"), ("floor_ms", "floor ms"),
           ("floor_pct", "floor / decode"), ("attn_share", "attention share of GPU time"),
           ("prefill_logits_diff", "prefill logits diff"),
           ("decode_logits_diff", "decode logits diff (sequences)"), ("logits_ok", "logits check"),
           ("token_agreement", "tokens = hf-eager"), ("forms", "mla forms"), ("note", "note")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--prompt", default="2048,16384,65536")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, help="layers of every model (default: published; V3/V3.2: what fits)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--profile-steps", type=int, default=4, help="decode steps under torch.profiler (0: none)")
    ap.add_argument("--host-profile", type=int, default=0, metavar="STEPS",
                    help="also write cProfile's table over STEPS decode steps of each row "
                         "(e2e-host-<system>-<model>-B<b>-P<p>.txt)")
    ap.add_argument("--assist", type=int, default=0, metavar="N",
                    help="assisted generation: generate(prompt_lookup_num_tokens=N) in every system (drafts "
                         "of up to N tokens verified per forward); decode ms/token and tokens against hf-eager's")
    ap.add_argument("--kernel-table", type=int, default=0, metavar="N",
                    help="also write the N kernels with the most GPU time per decode step of each row "
                         "(e2e-kernels-<system>-<model>-B<b>-P<p>.txt)")
    ap.add_argument("--out", help="result folder (default: $OUT, else benchmarks/results)")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny DeepSeek-V3, hf-eager and both mla recipes, float32")
    args = ap.parse_args(argv)
    if args.smoke:
        explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        args.systems = args.systems if "--systems" in explicit else "hf-eager,mla-static,mla"
        args.models, args.batch, args.prompt, args.dtype = "tiny-deepseek_v3", "1", "8", "fp32"
        args.new_tokens = min(args.new_tokens, 4) if "--new-tokens" not in explicit else args.new_tokens
        args.profile_steps = 0
        if args.new_tokens < 2:
            ap.error("--new-tokens must be at least 2 (the check compares the first decode step)")
    elif args.new_tokens < 64:
        ap.error("--new-tokens must be at least 64 (the decode median needs the steps)")
    args.systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown systems {bad}; known: {SYSTEMS}")
    args.systems.sort(key=SYSTEMS.index)
    args.models = [m for m in args.models.split(",") if m]
    if not args.smoke and any(m not in MODELS for m in args.models):
        ap.error(f"unknown models {[m for m in args.models if m not in MODELS]}; known: {list(MODELS)}")
    args.batch = sorted(int(b) for b in args.batch.split(","))
    args.prompt = sorted(int(p) for p in args.prompt.split(","))
    args.dtype = DTYPES[args.dtype]
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("e2e.py measures on a CUDA GPU; --smoke runs the tiny CPU version")
    device = torch.device("cuda" if cuda else "cpu")
    import mla_compile  # noqa: F401  (registers backend="mla" where the package is not installed)

    t_start = time.time()
    args.copy_rate = common.copy_rate(device) if cuda else None
    rows, model_notes = [], []
    for key in args.models:
        try:
            model = build_smoke(args.dtype) if args.smoke else build(key, args.layers, args.dtype, device)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append(dict(model=key, note=f"build failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}"))
            continue
        cfg = model.config
        name = key if args.smoke else MODELS[key].name
        floor = step_bytes(model) if cuda else None
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model_notes.append(f"{name}: {cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} "
                           f"heads, kv_lora_rank {cfg.kv_lora_rank}, qk_rope_head_dim {cfg.qk_rope_head_dim}, "
                           f"{n_bytes / 1e9:.2f} GB of weights")
        refs = {}
        for system in args.systems:
            oom_at = []
            for B in args.batch:
                for P in args.prompt:
                    row = dict(model=name, layers=cfg.num_hidden_layers, batch=B, prompt=P, system=system)
                    rows.append(row)
                    limit = getattr(cfg, "max_position_embeddings", None)
                    if limit and P + args.new_tokens > limit:
                        row["note"] = f"prompt + new tokens > max_position_embeddings ({limit})"
                        continue
                    if any(B >= b and P >= p for b, p in oom_at):
                        row["note"] = "skipped: out of memory at a smaller row"
                        continue
                    try:
                        prepare(model, system, device, args.smoke)
                        got, ref = run_row(model, system, B, P, args, device, refs.get((B, P)), floor)
                        row.update(got)
                        if system == "hf-eager":
                            refs[(B, P)] = ref
                        if system.startswith("mla"):
                            row["forms"] = forms_chosen()
                    except Exception as e:  # noqa: BLE001
                        if is_oom(e):
                            row["note"] = "OOM"
                            oom_at.append((B, P))
                        else:
                            traceback.print_exc()
                            row["note"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"
                    print(f"[{time.time() - t_start:6.0f}s] " + " ".join(f"{k}={v}" for k, v in row.items()),
                          flush=True)
                    # the report so far, rewritten after every row: a run stopped by a time limit keeps its rows
                    write(rows, model_notes, args, device, plot=False)
        release(model, device)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    write(rows, model_notes, args, device)


def write(rows, model_notes, args, device, plot=True):
    """The report of the rows so far; plot=False (after each row): no plot and nothing printed."""
    eager = {(r["model"], r["batch"], r["prompt"]): r.get("decode_ms") for r in rows if r.get("system") == "hf-eager"}
    for r in rows:
        base = eager.get((r.get("model"), r.get("batch"), r.get("prompt")))
        if base and r.get("decode_ms"):
            r["x_eager"] = round(base / r["decode_ms"], 2)
    stem = f"e2e-{common.device_label(device)}{'-smoke' if args.smoke else ''}{args.tag}"
    notes = [f"greedy generate(), {args.new_tokens} new tokens, {str(args.dtype).removeprefix('torch.')}, "
             "random weights; systems and columns: the docstring of benchmarks/e2e.py",
             f"logits check tolerance: {LOGITS_TOL[args.dtype]:g} of the largest hf-eager logit"]
    if args.copy_rate:
        notes.append(f"copy rate for the floor: {args.copy_rate / 1e12:.2f} TB/s (bytes read + written)")
    if args.smoke:
        notes.append(f"smoke: tiny deepseek_v3 (mla_compile.tiny), CPU, the mla systems with options={SMOKE_OPTIONS}, "
                     "no profiler columns")
    notes += [f"model {n}" for n in model_notes]
    table = common.Table("Decode and prefill through generate()", COLUMNS, rows)
    md, csv_path = common.write_report(stem, common.header("End to end: generate() per system", device, notes),
                                       [table], args.out, echo=plot)
    if not plot:
        return md, csv_path
    try:
        import plot
    except ImportError as e:          # matplotlib absent
        print(f"no plot ({e})")
    else:
        print(plot.e2e_plot(csv_path, csv_path[:-4] + ".png"))
    return md, csv_path


if __name__ == "__main__":
    main()
