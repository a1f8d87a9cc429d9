import os

import pytest
import torch

# Keep the CPU suite deterministic and quiet; the Triton interpreter tests set their own variables.
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
