import os
import tempfile

import pytest
import torch

# Native builds of the test session go to a private cache unless one is set.
os.environ.setdefault("LANGFIELD_CACHE_DIR", os.path.join(tempfile.gettempdir(), "langfield-test-cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
