"""Compile a DeepSeek-style model with backend="mla" and time generation against eager.

    python examples/generate_timing.py                   # CPU, tiny DeepSeek-V3 model, < 60 s
    python examples/generate_timing.py --real            # GPU: DeepSeek-V3 shapes, 2 layers, bf16

The tiny run hands the rewritten graph to eager execution (MLA_COMPILE_REMAINDER=eager, or pass
--inductor to use Inductor); the cache grows by one token per step, so after the first recompile
Dynamo makes the key length dynamic and the backend emits `torch.ops.mla.auto`, which picks the form
on the real sizes at every call (see the crossover printed at the end).

A third run uses a StaticCache the way CUDA graphs need it: `generate` compiles the decode steps
itself with CompileConfig(backend="mla", mode="reduce-overhead") (on the CPU: no CUDA graphs), and the
prefill stays eager, so HF marks the cache's buffers as static addresses and the kernels read only
the filled part of the cache.
"""

import argparse
import os
import time

import torch


def build(real: bool, dev):
    from transformers import AutoModelForCausalLM

    from mla_compile.tiny import tiny_config, tiny_model

    if not real:
        return tiny_model("deepseek_v3", attn_implementation="sdpa").to(dev)
    cfg = tiny_config("deepseek_v3", heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                      qk_nope_head_dim=128, v_head_dim=128, hidden_size=7168, layers=2, vocab_size=1024,
                      attn_implementation="sdpa", intermediate_size=18432, first_k_dense_replace=2,
                      max_position_embeddings=163840, initializer_range=0.02)
    with torch.device(dev):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).eval()


def timed_generate(model, ids, new_tokens, **kw):
    def sync():
        if ids.is_cuda:
            torch.cuda.synchronize()
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
        sync()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="DeepSeek-V3 shapes on the GPU")
    ap.add_argument("--inductor", action="store_true", help="compile the rest with Inductor (slow on CPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    a = ap.parse_args()
    if not a.inductor and not a.real:
        os.environ.setdefault("MLA_COMPILE_REMAINDER", "eager")
    dev = torch.device("cuda" if a.real else "cpu")
    B = a.batch or (8 if a.real else 2)
    P = a.prompt or (512 if a.real else 16)
    N = a.new_tokens or (32 if a.real else 8)
    import mla_compile

    torch.manual_seed(0)
    model = build(a.real, dev)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (B, P), device=dev)

    ref, t_eager = timed_generate(model, ids, N)
    print(f"eager:     {N} tokens x {B} sequences in {t_eager:.2f} s ({B * N / t_eager:.1f} tokens/s)")

    eager_forward = model.forward
    model.forward = torch.compile(model.forward, backend="mla")
    t0 = time.perf_counter()
    out, _ = timed_generate(model, ids, N)                 # first call: compiles (prefill, then decode)
    print(f"compile + first generate: {time.perf_counter() - t0:.1f} s")
    out, t_mla = timed_generate(model, ids, N)
    print(f"mla:       {N} tokens x {B} sequences in {t_mla:.2f} s ({B * N / t_mla:.1f} tokens/s), "
          f"{t_eager / t_mla:.2f}x eager")
    same = (out == ref).float().mean().item()
    print(f"greedy tokens equal to eager's: {100 * same:.1f}%  (random weights: near-ties may flip)")

    from transformers import CompileConfig

    model.forward = eager_forward             # generate compiles the decode steps itself below
    cc = CompileConfig(backend="mla", mode="reduce-overhead" if a.real else None)
    cc._compile_all_devices = not a.real      # HF compiles on accelerators only, unless told
    static = dict(cache_implementation="static", compile_config=cc)
    timed_generate(model, ids, N, **static)   # compiles the decode step (and records its CUDA graph)
    out, t_static = timed_generate(model, ids, N, **static)
    print(f"mla, static cache{' + CUDA graphs' if a.real else ''}: {B * N / t_static:.1f} tokens/s, "
          f"{t_eager / t_static:.2f}x eager; tokens equal to eager's: {100 * (out == ref).float().mean().item():.1f}%")
    print()
    print(mla_compile.format_rewrite_log())


if __name__ == "__main__":
    main()
