"""Trials per second on one GPU: warm hyperfleet workers against one fresh process per trial.

The trial is the small MLP of the design notes (hidden 256, batch 1024, 1,500 steps on random
data), small enough that process start-up and an idle GPU dominate. Ways compared, on GPU 0:

- ``fresh``: one new Python process per trial, one at a time (the launcher the seeds write);
- ``hyperfleet xN``: ``hyperfleet.optimize`` with ``trials_per_gpu=N`` warm workers on the GPU.

Rates are finished trials over wall time, start-up included, as a user would see them.

    python bench/gpu_throughput.py --trials 16 --packing 1 4 8

Needs torch with CUDA and an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

import hyperfleet

HIDDEN, BATCH, STEPS = 256, 1024, 1500


def train_once(lr: float) -> float:
    import torch

    device = "cuda:0"
    torch.manual_seed(0)
    x = torch.randn(BATCH * 8, 512, device=device)
    y = torch.randint(0, 10, (BATCH * 8,), device=device)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 10),
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.zeros((), device=device)
    for step in range(STEPS):
        batch = slice((step % 8) * BATCH, (step % 8 + 1) * BATCH)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
    return float(loss.item())


def objective(trial: optuna.Trial) -> float:
    return train_once(trial.suggest_float("lr", 1e-4, 1e-2, log=True))


def run_fresh(n_trials: int) -> float:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    start = time.perf_counter()
    for number in range(n_trials):
        lr = 1e-4 * (100 ** (number / max(n_trials - 1, 1)))
        subprocess.run([sys.executable, __file__, "--one-trial", str(lr)], env=env, check=True)
    return n_trials / (time.perf_counter() - start)


def run_hyperfleet(n_trials: int, per_gpu: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        study = optuna.create_study(study_name="gpu-bench")
        start = time.perf_counter()
        hyperfleet.optimize(
            study,
            objective,
            n_trials=n_trials,
            gpus=["0"],
            trials_per_gpu=per_gpu,
            cpu_slots=0,
            run_dir=Path(folder) / "run",
            display="quiet",
            report=False,
        )
        return n_trials / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--packing", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--one-trial", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_trial is not None:
        train_once(args.one_trial)
        return

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fresh = run_fresh(args.trials)
    print(f"{args.trials} trials of an MLP (hidden {HIDDEN}, batch {BATCH}, {STEPS} steps)")
    print(f"{'way':<16}{'trials/s':>10}{'vs fresh':>10}")
    print(f"{'fresh':<16}{fresh:>10.3f}{1.0:>9.1f}x")
    for per_gpu in args.packing:
        rate = run_hyperfleet(args.trials, per_gpu)
        print(f"{f'hyperfleet x{per_gpu}':<16}{rate:>10.3f}{rate / fresh:>9.1f}x")


if __name__ == "__main__":
    main()
