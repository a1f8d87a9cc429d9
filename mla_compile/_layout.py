"""`passes/` and `kernels/` sit at the top of the repository but are the subpackages
mla_compile.passes and mla_compile.kernels.

`kernels/` has no `__init__.py`, on purpose: transformers imports the PyPI package `kernels`, and
whenever the repository root is on sys.path (`python` or `python -m pytest` started there) a
*regular* package `kernels/` in it would be found before site-packages and shadow that package.
A folder without `__init__.py` is only a namespace portion, and Python's path finder takes any
regular package of the same name before it, so `import kernels` always gets the PyPI package.
(tests/test_layout.py checks this from the repository root.)

An installed wheel holds the files under mla_compile/kernels/, where the ordinary path finder finds
them. An editable install (`pip install -e .`) maps mla_compile.kernels to the top-level folder, but
setuptools' editable finder only resolves mapped packages that have an `__init__.py`; a bare source
checkout on PYTHONPATH has no mapping at all. For both, this finder (the last on sys.meta_path, so
asked only when the others found nothing) maps the two subpackages to the checkout's folders."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SUBPACKAGES = {f"mla_compile.{name}": os.path.join(_ROOT, name) for name in ("passes", "kernels")}


def _is_checkout(root: str) -> bool:
    """The folder above mla_compile/ is this project's source tree (not site-packages, whose
    `kernels/` is the PyPI package)."""
    try:
        with open(os.path.join(root, "pyproject.toml")) as f:
            return 'name = "mla-compile"' in f.read()
    except OSError:
        return False


class _CheckoutFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        # Only the two subpackages themselves: their modules are then found through the
        # package's __path__ by the ordinary path finder.
        directory = _SUBPACKAGES.get(fullname)
        return _package_spec(fullname, directory) if directory else None


def _package_spec(fullname: str, directory: str):
    if not os.path.isdir(directory):
        return None
    init = os.path.join(directory, "__init__.py")
    if os.path.isfile(init):
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[directory])
    spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)     # a namespace package
    spec.submodule_search_locations = [directory]
    return spec


if _is_checkout(_ROOT) and _CheckoutFinder not in sys.meta_path:
    sys.meta_path.append(_CheckoutFinder)
