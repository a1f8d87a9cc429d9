"""`passes/` and `kernels/` sit at the top of the repository but are the subpackages
mla_compile.passes and mla_compile.kernels (a top-level `kernels` would shadow the PyPI package
that transformers imports). An installed copy (pip install ., or -e .) maps them already; this finder
does the same for a bare source checkout on PYTHONPATH, and does nothing otherwise."""

from __future__ import annotations

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SUBPACKAGES = {f"mla_compile.{name}": os.path.join(_ROOT, name) for name in ("passes", "kernels")}


class _CheckoutFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        # Only the two subpackages themselves: their modules are then found through the
        # package's __path__ by the ordinary path finder.
        directory = _SUBPACKAGES.get(fullname)
        return _package_spec(fullname, directory) if directory else None


def _package_spec(fullname: str, directory: str):
    init = os.path.join(directory, "__init__.py")
    if not os.path.isfile(init):
        return None
    return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[directory])


if all(os.path.isfile(os.path.join(d, "__init__.py")) for d in _SUBPACKAGES.values()):
    sys.meta_path.append(_CheckoutFinder)
