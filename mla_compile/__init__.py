"""mla-compile: a torch.compile backend for Multi-head Latent Attention.

    model.compile(backend="mla")                  # found through the torch_dynamo_backends entry point
    mla_compile.compile_generate(model)           # generate(): StaticCache + CUDA graphs, decode step compiled
    import mla_compile; print(mla_compile.format_rewrite_log())
"""

from mla_compile import _layout  # noqa: F401  (maps passes/ and kernels/ in a source checkout)
from mla_compile.rewrite_log import compile_times, format_rewrite_log, rewrite_log

__all__ = ["compile_generate", "compile_times", "export_mlir", "format_rewrite_log", "plan", "reset", "rewrite_log"]
__version__ = "0.1.0"


def _register_backend() -> None:
    """An installed copy is found through its entry point; a bare source checkout on PYTHONPATH has
    no distribution metadata, so importing the package registers the backend by hand."""
    from importlib.metadata import entry_points

    if any(ep.name == "mla" for ep in entry_points(group="torch_dynamo_backends")):
        return      # torch loads it (and may be loading it right now: registering here would clash)
    from torch._dynamo.backends.registry import register_backend

    from mla_compile.backend import mla_backend

    register_backend(name="mla")(mla_backend)


_register_backend()

from mla_compile import torch_logs as _torch_logs  # noqa: E402

_torch_logs.register()      # TORCH_LOGS="+mla_compile" shows the mla_compile logger


def reset() -> None:
    """Forget the rewrite log and its graph numbering, and read MLA_COMPILE_KERNELS again."""
    from mla_compile.backend import reset_graph_ids
    from mla_compile.kernels import registry
    from mla_compile.rewrite_log import reset as _reset_log

    _reset_log()
    reset_graph_ids()
    registry.reset()


def export_mlir(model, *args, **kwargs):
    """MLIR of model(*args) with the MLA regions rewritten: see mla_compile.mlir.export_mlir."""
    from mla_compile.mlir import export_mlir as _export_mlir

    return _export_mlir(model, *args, **kwargs)


def compile_generate(model, **kwargs):
    """Make model.generate() decode through a StaticCache compiled by backend="mla" (CUDA graphs on
    CUDA): see mla_compile.recipes.compile_generate."""
    from mla_compile.recipes import compile_generate as _compile_generate

    return _compile_generate(model, **kwargs)


def plan(**kwargs):
    """The cost model's decision for one layer's shapes: see mla_compile.cost.plan."""
    from mla_compile.cost import plan as _plan

    return _plan(**kwargs)
