"""Put the fake ``pynvml`` of ``support/nvml/`` in the real one's place, for this process and
(through ``PYTHONPATH``) for the processes it starts, answering from a machine described as a
dict (see ``support/nvml/pynvml.py`` for its keys)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

FOLDER = Path(__file__).parent / "nvml"
CONFIG_ENV = "HYPERFLEET_TEST_NVML"


def use_fake_nvml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, machine: dict[str, Any]
) -> ModuleType:
    """The fake module, now what ``import pynvml`` gives, with ``machine`` its GPUs."""
    config = tmp_path / "nvml.json"
    config.write_text(json.dumps(machine))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FOLDER), path]) if path else str(FOLDER))
    monkeypatch.delenv("HYPERFLEET_FAKE_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec = importlib.util.spec_from_file_location("pynvml", FOLDER / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    spec.loader.exec_module(module)
    return module


def rewrite(machine: dict[str, Any]) -> None:
    """Change the machine the fake describes (read again at the next ``nvmlInit``)."""
    Path(os.environ[CONFIG_ENV]).write_text(json.dumps(machine))


def device(index: int, **extra: Any) -> dict[str, Any]:
    """A healthy 80 GiB GPU numbered ``index``, with ``extra`` keys on top."""
    return {
        "uuid": f"GPU-{index:08d}-0000-0000-0000-000000000000",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_mib": 81559,
        **extra,
    }
