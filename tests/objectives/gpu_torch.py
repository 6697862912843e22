"""PyTorch objectives for the tests that need a real NVIDIA GPU (tests/test_gpu.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from slot_probe import wait_for_peers  # tests/objectives is on the workers' sys.path

import hyperfleet

MIB = 1024 * 1024


def record_device(trial: optuna.Trial) -> None:
    """What CUDA shows this worker, next to the slot hyperfleet gave it."""
    slot = hyperfleet.current_slot()
    properties = torch.cuda.get_device_properties(0)
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    trial.set_user_attr("device_count", torch.cuda.device_count())
    trial.set_user_attr("device_name", torch.cuda.get_device_name(0))
    trial.set_user_attr("device_uuid", f"GPU-{properties.uuid}")
    trial.set_user_attr("slot_gpus", list(slot.gpus))
    trial.set_user_attr("slot_uuids", list(slot.gpu_uuids))


def make_trainer(barrier_dir: str, parties: int) -> Callable[[optuna.Trial], float]:
    """Trains a tiny MLP on the slot's GPU, then holds until ``parties`` workers have trained."""

    def objective(trial: optuna.Trial) -> float:
        record_device(trial)
        loss = train_tiny_mlp(trial)
        wait_for_peers(Path(barrier_dir), parties)
        return loss

    return objective


def train_tiny_mlp(trial: optuna.Trial) -> float:
    torch.manual_seed(trial.number)
    device = torch.device(hyperfleet.current_slot().device)
    x = torch.randn(512, 16, device=device)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    hidden = trial.suggest_int("hidden", 8, 32)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=trial.suggest_float("lr", 1e-2, 1e-1))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loss = torch.tensor(0.0)
    for epoch in range(5):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        trial.report(loss.item(), epoch)
    trial.set_user_attr("parameters_on", str(next(model.parameters()).device))
    return float(loss.item())


def cache_probe(trial: optuna.Trial) -> float:
    """Records the CUDA cache this worker holds when the trial starts, then fills it."""
    trial.set_user_attr("reserved_at_start_mib", torch.cuda.memory_reserved() // MIB)
    block = torch.ones(64 * MIB // 4, device="cuda:0")  # 64 MiB of float32
    total = float(block.sum().item())
    trial.set_user_attr("reserved_after_alloc_mib", torch.cuda.memory_reserved() // MIB)
    return total


def small_trainer(trial: optuna.Trial) -> float:
    """A small MLP for about half a second: it leaves most of a GPU idle, so auto packing
    should add workers."""
    torch.manual_seed(trial.number)
    x = torch.randn(4096, 256, device="cuda:0")
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)
    ).to("cuda:0")
    optimizer = torch.optim.Adam(model.parameters(), lr=trial.suggest_float("lr", 1e-4, 1e-2))
    loss = torch.zeros((), device="cuda:0")
    for _ in range(300):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
    return float(loss.item())


def most_of_the_gpu(trial: optuna.Trial) -> float:
    """Takes 60 % of the GPU's memory for a second: two such trials cannot share it."""
    _, total = torch.cuda.mem_get_info()
    block = torch.empty(int(total * 0.6), dtype=torch.uint8, device="cuda:0")
    a = torch.randn(1024, 1024, device="cuda:0")
    for _ in range(50):
        a = torch.tanh(a @ a)
    torch.cuda.synchronize()
    del block
    return float(a.mean()) + trial.suggest_float("x", 0.0, 1.0)
