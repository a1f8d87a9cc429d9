"""The repository's layout never shadows a package that a dependency imports.

`kernels/` (ours, installed as mla_compile.kernels) and the PyPI package `kernels` (which
transformers imports) share a name; with the repository root on sys.path, as it is for `python` or
`python -m pytest` started there, ours must not win. See mla_compile/_layout.py for the mechanism.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("cwd", [ROOT, "/tmp"], ids=["repository-root", "elsewhere"])
def test_import_kernels_is_the_pypi_package(cwd):
    """`import kernels, transformers` from the repository root gets PyPI's `kernels`, and our kernels
    are still mla_compile.kernels."""
    if importlib.util.find_spec("kernels") is None or "kernels" not in importlib.metadata.packages_distributions():
        pytest.skip("the PyPI package `kernels` is not installed")
    out = _run_python("""
        import kernels, transformers
        import mla_compile.kernels.registry, mla_compile.passes.match
        print(kernels.__file__)
        print(mla_compile.kernels.registry.__file__)
    """, cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    pypi_kernels, ours = out.stdout.strip().splitlines()
    assert not os.path.realpath(pypi_kernels).startswith(os.path.realpath(ROOT) + os.sep), pypi_kernels
    assert os.path.basename(ours) == "registry.py"


def test_no_top_level_folder_is_a_package_a_distribution_installs():
    """Every top-level folder of ours that Python would import as a regular package from the
    repository root has a name no installed distribution (other than ours) provides."""
    installed = importlib.metadata.packages_distributions()
    clashes = []
    for name in sorted(os.listdir(ROOT)):
        if os.path.isfile(os.path.join(ROOT, name, "__init__.py")):
            others = [d for d in installed.get(name, []) if d.lower().replace("_", "-") != "mla-compile"]
            if others:
                clashes.append(f"{name}/ shadows {others}")
    assert not clashes, clashes


def test_installed_layout_has_no_top_level_passes_or_kernels():
    """Outside the repository, neither `passes` nor our `kernels` is importable as a top-level name."""
    out = _run_python("""
        import importlib.util, mla_compile.passes, mla_compile.kernels
        print(importlib.util.find_spec("passes"), mla_compile.passes.__name__, mla_compile.kernels.__name__)
        spec = importlib.util.find_spec("kernels")
        print(spec.origin if spec else None)
    """, "/tmp")
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.strip().splitlines()
    assert first == "None mla_compile.passes mla_compile.kernels"
    assert second == "None" or not os.path.realpath(second).startswith(os.path.realpath(ROOT) + os.sep)
