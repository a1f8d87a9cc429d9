"""The fast way to generate, set once on a model.

    import mla_compile
    mla_compile.compile_generate(model)          # then plain model.generate(ids, max_new_tokens=...)

`model.compile(backend="mla")` compiles every call of the module, and HF's `generate` then decodes
through a DynamicCache: each step appends to the latent cache with `torch.cat` (a copy of every
layer's whole cache), the key length changes every step (so the compiled graph is dynamic and runs
without CUDA graphs), and every kernel is launched from Python. None of that is visible to a
backend, which receives graphs, not the cache object. What is fast is HF's own static path:
`generate` preallocates a StaticCache, runs the prefill eagerly, and compiles the decode step once
with a `CompileConfig`, whose `mode="reduce-overhead"` replays the whole step as CUDA graphs. This
module sets that up on the model's generation config, so the user's `generate()` calls need no
arguments of ours.
"""

from __future__ import annotations

from typing import Any


def compile_generate(model: Any, *, mode: str | None = "reduce-overhead", options: dict | None = None,
                     max_cache_len: int | None = None) -> Any:
    """Make `model.generate()` decode through a StaticCache, the decode step compiled by backend="mla".

    Sets `model.generation_config.cache_implementation = "static"` and its `compile_config` to
    `CompileConfig(backend="mla", mode=mode, options=options)`; returns the model. `mode` is
    "reduce-overhead" (CUDA graphs) on CUDA; on other devices CUDA graphs do not exist, so mode
    None is used there, and HF is told to compile off the GPU too (it does not by default). Options
    are checked here, so a bad one fails now rather than at the first decode step. `max_cache_len`,
    if given, sizes the static cache for the longest call to come (without it HF sizes it for the
    longest call so far, so a longer call re-creates the cache and recompiles the decode step).
    """
    from transformers import CompileConfig

    from mla_compile.backend import Options

    Options.parse(options)
    on_cuda = model.device.type == "cuda"
    config = CompileConfig(backend="mla", mode=mode if on_cuda else None, options=options)
    if not on_cuda:
        config._compile_all_devices = True      # HF's switch for compiling on a device without CUDA graphs
    gen = model.generation_config
    gen.cache_implementation = "static"
    gen.compile_config = config
    if max_cache_len is not None:
        gen.max_cache_len = max_cache_len
    return model
