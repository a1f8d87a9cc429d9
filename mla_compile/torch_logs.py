"""Register the `mla_compile` logger with torch's logging, so TORCH_LOGS controls it.

    TORCH_LOGS="+mla_compile" python run.py        # DEBUG and up, through torch's log handler
    TORCH_LOGS="mla_compile" python run.py         # INFO and up
    torch._logging.set_logs(mla_compile=logging.DEBUG)

torch parses TORCH_LOGS when torch._logging is first imported; a name it does not know then is
accepted only if it is an importable module (`mla_compile` is one). `register()` adds the name to
torch's log registry (so it is listed by TORCH_LOGS="help" and accepted by set_logs) and re-applies
TORCH_LOGS, so the setting takes effect whichever was imported first.
"""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "mla_compile"
SETTING_NAME = "mla_compile"
_DONE = False


def register() -> bool:
    """Idempotent; False where this torch has no torch._logging registry (nothing to do then)."""
    global _DONE
    if _DONE:
        return True
    try:
        from torch._logging import _internal
    except ImportError:  # pragma: no cover - very old torch
        return False
    registry = getattr(_internal, "log_registry", None)
    try:
        if registry is None or SETTING_NAME not in getattr(registry, "log_alias_to_log_qnames", {}):
            _internal.register_log(SETTING_NAME, LOGGER_NAME)
    except Exception:  # noqa: BLE001 - a torch without this API: TORCH_LOGS still takes module names
        return False
    _DONE = True
    if os.environ.get("TORCH_LOGS") and SETTING_NAME in os.environ["TORCH_LOGS"]:
        try:
            _internal._init_logs()      # re-read TORCH_LOGS now that the name is registered
        except Exception:  # noqa: BLE001
            pass
    logging.getLogger(LOGGER_NAME)
    return True
