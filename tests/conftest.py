import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. Triton decides between compiled and
# interpreted functions when @triton.jit runs, i.e. when a kernel module is imported, so the mode is
# set here, before any test module can import one (a module imported in the other mode cannot be
# reliably reloaded: its @triton.jit helpers are shared across modules).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_log():
    import mla_compile

    # Each test compiles fresh models of the same classes: without a reset their guards pile up on
    # one code object until Dynamo's cache limit silently falls back to eager.
    torch._dynamo.reset()
    mla_compile.reset()
    yield


def pytest_sessionfinish(session, exitstatus):
    """Once every family test has run in this session, the README's family table must be what they
    found (independent of the order the files ran in); a difference fails the run."""
    from tests.test_family_table import check_family_table

    problem = check_family_table()
    if problem:
        session.config.get_terminal_writer().line("\n" + problem, red=True)
        session.exitstatus = 1
