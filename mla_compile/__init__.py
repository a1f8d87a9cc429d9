"""mla-compile: a torch.compile backend for Multi-head Latent Attention.

    fast = torch.compile(model, backend="mla")   # found through the torch_dynamo_backends entry point
    import mla_compile; print(mla_compile.format_rewrite_log())
"""

from mla_compile.rewrite_log import format_rewrite_log, reset, rewrite_log

__all__ = ["format_rewrite_log", "reset", "rewrite_log"]
__version__ = "0.1.0"
