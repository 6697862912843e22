"""Trials per second on one GPU: one fresh process per trial against warm hyperfleet workers at
fixed packings and under auto packing, and an out-of-memory case.

One command runs the whole protocol on GPU 0 and prints Markdown tables for bench/RESULTS.md:

    python bench/gpu_throughput.py                # everything (about 12 minutes on an H100)
    python bench/gpu_throughput.py --only small   # one part: fresh, small, large or oom

- ``fresh``: one new Python process per trial, one at a time (the launcher the seeds write),
  small model;
- ``small`` and ``large``: ``hyperfleet.optimize`` with 1, 4, 8 and 16 warm workers on the GPU
  (``trials_per_gpu=N``) and with ``trials_per_gpu="auto"``; the small MLP of the design notes
  (hidden 256, batch 1024, 1,500 steps) and a large one (hidden 2048, batch 8192);
- ``oom``: trials that each take 60 % of the GPU's memory, packed by 2 and by auto.

Rates are finished trials over wall time, start-up included, as a user would see them. A run
with out-of-memory failures counts only its completed trials. Needs torch with CUDA and an
NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

import hyperfleet

MODELS = {"small": (256, 1024, 1500), "large": (2048, 8192, 300)}  # hidden, batch, steps
OOM_SHARE = 0.60  # of the GPU's memory, per trial of the out-of-memory case
OOM_SECONDS = 3.0
DECISION = re.compile(r"gpu0: \d+ -> (\d+) workers?")


@dataclass(frozen=True)
class Result:
    way: str
    rate: float  # completed trials per second
    complete: int
    failed_oom: int
    workers: str  # the workers the GPU ended with


def train_once(lr: float, model: str) -> float:
    import torch

    hidden, batch, steps = MODELS[model]
    device = "cuda:0"
    torch.manual_seed(0)
    x = torch.randn(batch * 8, 512, device=device)
    y = torch.randint(0, 10, (batch * 8,), device=device)
    net = torch.nn.Sequential(
        torch.nn.Linear(512, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    ).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss = torch.zeros((), device=device)
    for step in range(steps):
        rows = slice((step % 8) * batch, (step % 8 + 1) * batch)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[rows]), y[rows])
        loss.backward()
        optimizer.step()
    return float(loss.item())


def hold_most_memory(lr: float) -> float:
    """The out-of-memory case: take OOM_SHARE of the GPU, then compute on it for a while."""
    import torch

    _, total = torch.cuda.mem_get_info()
    block = torch.empty(int(total * OOM_SHARE), dtype=torch.uint8, device="cuda:0")
    a = torch.randn(2048, 2048, device="cuda:0")
    deadline = time.perf_counter() + OOM_SECONDS
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)
        torch.cuda.synchronize()
    del block
    return float(a.mean()) * lr


def make_objective(model: str) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        return hold_most_memory(lr) if model == "oom" else train_once(lr, model)

    return objective


def run_fresh(n_trials: int) -> Result:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    start = time.perf_counter()
    for number in range(n_trials):
        lr = 1e-4 * (100 ** (number / max(n_trials - 1, 1)))
        command = [sys.executable, __file__, "--one-trial", str(lr)]
        subprocess.run(command, env=env, check=True)
    rate = n_trials / (time.perf_counter() - start)
    return Result("fresh process per trial", rate, n_trials, 0, "1")


def run_hyperfleet(model: str, n_trials: int, per_gpu: int | str) -> Result:
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        study = optuna.create_study(study_name=f"gpu-bench-{model}")
        start = time.perf_counter()
        hyperfleet.optimize(
            study,
            make_objective,
            n_trials=n_trials,
            gpus=["0"],
            trials_per_gpu=per_gpu,
            cpu_slots=0,
            run_dir=run_dir,
            display="quiet",
            report=False,
            objective_kwargs={"model": model},
        )
        seconds = time.perf_counter() - start
        log = (run_dir / "run.log").read_text()
    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    oom = sum(t.system_attrs.get("hyperfleet:fail_kind") == "oom" for t in trials)
    if per_gpu == "auto":
        steps = DECISION.findall(log)
        workers = " -> ".join(["1", *steps])
    else:
        workers = str(per_gpu)
    return Result(f"hyperfleet {per_gpu}", complete / seconds, complete, oom, workers)


def table(title: str, results: list[Result], base: float | None) -> str:
    lines = [
        f"### {title}",
        "",
        "| way | trials/s | vs first | completed | failed out of memory | workers on the GPU |",
        "|---|---:|---:|---:|---:|---|",
    ]
    first = base or (results[0].rate if results else 1.0)
    for r in results:
        lines.append(
            f"| {r.way} | {r.rate:.3f} | {r.rate / first:.2f}x | {r.complete} | "
            f"{r.failed_oom} | {r.workers} |"
        )
    return "\n".join(lines) + "\n"


def card_name() -> str:
    import pynvml

    pynvml.nvmlInit()
    try:
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        memory = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
    finally:
        pynvml.nvmlShutdown()
    text = name.decode() if isinstance(name, bytes) else name
    return f"{text}, {memory / 2**30:.0f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", choices=["fresh", "small", "large", "oom"], nargs="+")
    parser.add_argument("--fresh-trials", type=int, default=8)
    parser.add_argument("--small-trials", type=int, default=48)
    parser.add_argument("--large-trials", type=int, default=16)
    parser.add_argument("--oom-trials", type=int, default=8)
    parser.add_argument("--packing", nargs="+", default=["1", "4", "8", "16", "auto"])
    parser.add_argument("--one-trial", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_trial is not None:
        train_once(args.one_trial, "small")
        return
    parts = args.only or ["fresh", "small", "large", "oom"]
    packings: list[int | str] = [p if p == "auto" else int(p) for p in args.packing]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"## {time.strftime('%Y-%m-%d')}: GPU throughput on one {card_name()}\n", flush=True)
    fresh = None
    if "fresh" in parts:
        fresh = run_fresh(args.fresh_trials)
        print(table("small MLP, fresh process per trial", [fresh], None), flush=True)
    for model, n_trials in (("small", args.small_trials), ("large", args.large_trials)):
        if model in parts:
            results = [run_hyperfleet(model, n_trials, p) for p in packings]
            base = fresh.rate if fresh is not None and model == "small" else None
            hidden, batch, steps = MODELS[model]
            title = f"{model} MLP (hidden {hidden}, batch {batch}, {steps} steps)"
            title += f", {n_trials} trials"
            note = " (vs the fresh process)" if base else " (vs the first line)"
            print(table(title + note, results, base), flush=True)
    if "oom" in parts:
        results = [run_hyperfleet("oom", args.oom_trials, p) for p in (2, "auto")]
        title = f"out of memory: {args.oom_trials} trials taking {OOM_SHARE:.0%} of the GPU each"
        print(table(title, results, None), flush=True)


if __name__ == "__main__":
    main()
