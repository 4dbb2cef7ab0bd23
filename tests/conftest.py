import os
import tempfile

import pytest
import torch

# Native builds of the test session go to a private cache unless one is set.
os.environ.setdefault("LANGFIELD_CACHE_DIR", os.path.join(tempfile.gettempdir(), "langfield-test-cache"))


def _require_gpu() -> bool:
    return os.environ.get("LANGFIELD_REQUIRE_GPU", "").strip() == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped without a CUDA device, unless LANGFIELD_REQUIRE_GPU=1
    (scripts/gpu_check.sh sets it): then they fail, so a GPU check that could not see its GPU
    never reports success."""
    if torch.cuda.is_available() or _require_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and _require_gpu() and not torch.cuda.is_available():
        pytest.fail("LANGFIELD_REQUIRE_GPU=1 but torch sees no CUDA device (torch.cuda.is_available() is False)",
                    pytrace=False)
