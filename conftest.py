"""What tests/ and benchmarks/ share: the ``gpu`` marker, and skipping what it marks where there is no CUDA GPU.

torch is imported inside the hook: each suite's own conftest sets TRITON_INTERPRET before anything imports triton.
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped elsewhere, run by benchmarks/gpu_check.sh")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU, none here (benchmarks/gpu_check.sh runs it on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
