"""mla-compile: a torch.compile backend for Multi-head Latent Attention.

    model.compile(backend="mla")                  # found through the torch_dynamo_backends entry point
    import mla_compile; print(mla_compile.format_rewrite_log())
"""

from mla_compile import _layout  # noqa: F401  (maps passes/ and kernels/ in a source checkout)
from mla_compile.rewrite_log import format_rewrite_log, reset, rewrite_log

__all__ = ["format_rewrite_log", "plan", "reset", "rewrite_log"]
__version__ = "0.1.0"


def plan(**kwargs):
    """The cost model's decision for one layer's shapes: see mla_compile.cost.plan."""
    from mla_compile.cost import plan as _plan

    return _plan(**kwargs)
