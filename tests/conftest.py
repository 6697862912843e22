"""Shared test set-up: tests marked ``gpu`` run only with a CUDA build of torch installed."""

from __future__ import annotations

import importlib.util

import pytest


def _cuda_available() -> bool:
    # Asks neither the driver nor CUDA: the test process itself must never initialise CUDA
    # (only its workers do); whether a GPU is really there is NVML's answer, in each test.
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.version.cuda is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and torch with CUDA")
    for item in gpu_items:
        item.add_marker(skip)
