"""Controller capacity at cluster scale: many remote slots over a few agent connections.

    python bench/cluster_capacity.py                                   # the full table
    python bench/cluster_capacity.py --slots 64 --samplers random --studies 1000

A load generator plays the agents: ``--connections`` processes (4 by default) each connect to a
real controller (``hyperfleet run --listen``) with the run's token, say hello with a node of
fake GPUs, and answer for every worker the controller starts there, at once: ready, loaded,
then for each trial the four ``suggest_float`` calls of :func:`objective` and a result. Like a
real worker, it answers a suggestion from those sent with the trial when the controller sent
one (and tells it so without waiting); any other is a round trip through the controller's
sampler. Trials take no time, so the controller is the
only limit. The study starts with ``--studies`` finished trials (written by plain Optuna) and
runs ``--new-trials`` more (fewer for TPE, whose cost grows with the study).

Figures: trials/s over the run (first trial sent to last result), and each slot's wait for its
next trial (from the result it sent to the next trial it receives), from the load generator's
clock; the controller's CPU seconds per trial say how much of it the controller spent; "sent %"
is the share of trials sent with values for their suggestions (with TPE: those whose values a
sampler process made ready, see ``hyperfleet.controller.sampler_pool``); "steady" is the
controller's CPU per trial over the middle three fifths of the new trials (start-up, imports
and the pools' start left out, and so is the end of the run: its report and outcome read the
whole study once, a cost per run, not per trial); "1/5-end" is the controller's CPU per trial
from the first fifth to the end, the end of the run included (what "steady" was before
2026-12-07's second pool entry in ``bench/RESULTS.md``). ``--sampling-processes
0 2`` alternates runs without and with two sampler processes, to compare them side by side.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import multiprocessing
import os
import pickle
import queue
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import optuna
import psutil
from common import PARAMS, build_journal, run_folder

from hyperfleet.cluster.channel import connect
from hyperfleet.cluster.messages import (
    Beat,
    Goodbye,
    Hello,
    Joined,
    Relay,
    Relays,
    StartWorker,
    WorkerStarted,
)
from hyperfleet.resources.inventory import Gpu, Inventory
from hyperfleet.workers.protocol import Call, Finished, Load, Loaded, Ready, Reply, RunTrial

TOKEN = "capacity-bench-token"
STUDY = "capacity"
NAMES = list(PARAMS)
SPACE = PARAMS[NAMES[0]]  # every parameter's distribution: FloatDistribution(-10, 10)


def objective(trial: optuna.Trial) -> float:
    """What each played trial does: four suggestions, no work."""
    return sum(trial.suggest_float(name, -10.0, 10.0) for name in NAMES)


def _pack(message: Any) -> bytes:
    return bytes(ForkingPickler.dumps(message))


class Node:
    """One played agent: every worker answers the moment it is asked, and returns its result
    ``trial_seconds`` after its last suggestion."""

    def __init__(self, conn: Connection, trial_seconds: float = 0.0, spread: float = 0.0) -> None:
        self.conn = conn
        self.trial_seconds = trial_seconds
        self.spread = spread  # each trial lasts trial_seconds x (1 + spread x uniform(0, 1))
        self.random = random.Random(os.getpid())
        self.due: list[tuple[float, int]] = []  # (when, worker): results still to send
        self.step: dict[int, int] = {}  # worker -> suggestions made in its current trial
        self.sent: dict[int, dict[str, Any]] = {}  # worker -> suggestions sent with its trial
        self.sent_result: dict[int, float] = {}
        self.waits: list[float] = []
        self.trials = 0
        self.sent_trials = 0  # trials sent with values for their suggestions
        self.first = self.last = 0.0
        self.finished: Any = None  # a counter shared by every played node, if given
        self.outbox: list[Relay] = []  # relays to send together

    def run(self) -> None:
        last_beat = time.monotonic()
        while True:
            self._send_due_results()
            self._flush()
            timeout = max(0.0, self.due[0][0] - time.monotonic()) if self.due else 1.0
            if not self.conn.poll(timeout):
                continue
            message = self.conn.recv()
            if isinstance(message, Goodbye):
                return
            if isinstance(message, StartWorker):
                self.conn.send(WorkerStarted(message.worker, os.getpid()))
                self._relay(message.worker, Ready(os.getpid()))
            elif isinstance(message, Relays):
                for relay in message.items:
                    self._on_relay(relay.worker, pickle.loads(relay.payload))
            self._flush()
            if time.monotonic() - last_beat > 1.0:
                self.conn.send(Beat())
                last_beat = time.monotonic()

    def _relay(self, worker: int, message: Any) -> None:
        self.outbox.append(Relay(worker, _pack(message)))

    def _flush(self) -> None:
        """What the workers said while one message was handled goes in one frame, as an agent
        sends what its workers said during one step (``hyperfleet.cluster.agent``)."""
        if self.outbox:
            relays, self.outbox = tuple(self.outbox), []
            self.conn.send(Relays(relays))

    def _on_relay(self, worker: int, message: Any) -> None:
        now = time.time()
        if isinstance(message, RunTrial):
            if worker in self.sent_result:
                self.waits.append(now - self.sent_result.pop(worker))
            self.first = self.first or now
            self.step[worker] = 0
            self.sent[worker] = getattr(message, "suggestions", {})  # older versions: none
            self.sent_trials += bool(self.sent[worker])
            self._next(worker)
        elif isinstance(message, Reply):
            self._next(worker)
        elif isinstance(message, Load):  # the objective "loads" at once
            self._relay(worker, Loaded(message.study))

    def _next(self, worker: int) -> None:
        while (step := self.step[worker]) < len(NAMES):
            self.step[worker] = step + 1
            sent = self.sent[worker].get(NAMES[step])
            answered = sent is not None and sent[0] == SPACE
            call = Call("trial", "suggest_float", (NAMES[step], -10.0, 10.0), {})
            if answered:
                call = replace(call, answered=True)  # never with a version that sent none
            self._relay(worker, call)
            if not answered:
                return  # its reply calls this again
        if self.trial_seconds:
            seconds = self.trial_seconds * (1 + self.spread * self.random.random())
            heapq.heappush(self.due, (time.monotonic() + seconds, worker))
            return
        self._finish(worker)

    def _send_due_results(self) -> None:
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            self._finish(heapq.heappop(self.due)[1])

    def _finish(self, worker: int) -> None:
        self._relay(worker, Finished("returned", value=1.0))
        self.sent_result[worker] = self.last = time.time()
        self.trials += 1
        if self.finished is not None:
            with self.finished.get_lock():
                self.finished.value += 1


def play_node(
    address: tuple[str, int],
    index: int,
    slots: int,
    trial_seconds: tuple[float, float],
    results: Any,
    finished: Any = None,
) -> None:
    conn = connect(address, TOKEN.encode(), patience=60.0)
    gpus = tuple(Gpu(i, f"GPU-bench-{i}", "Bench GPU", kind="fake") for i in range(slots))
    cores = tuple(range(max(1, -(-slots // 16))))  # a node that may run this many workers
    conn.send(Hello(f"load{index}", Inventory(gpus=gpus, cores=cores), os.getpid()))
    conn.recv()  # the welcome
    conn.send(Joined(shares_run_dir=True))  # the same machine: the run directory is here
    node = Node(conn, *trial_seconds)
    node.finished = finished
    node.run()
    results.put((node.trials, node.first, node.last, node.waits, node.sent_trials))


def controller_command(
    run_dir: Path,
    token: Path,
    port: int,
    sampler: str,
    n_trials: int,
    profile: Path | None,
    sampling_processes: int | None = None,
) -> list[str]:
    python = [sys.executable]
    if profile is not None:
        python += ["-m", "cProfile", "-o", str(profile)]
    pool = [] if sampling_processes is None else ["--sampling-processes", str(sampling_processes)]
    return [
        *python, "-m", "hyperfleet.app.cli", "run", f"{Path(__file__)}:objective",
        "--study-name", STUDY, "--run-dir", str(run_dir), "--n-trials", str(n_trials),
        "--sampler", sampler, "--seed", "1", "--listen", f"127.0.0.1:{port}",
        "--token-file", str(token), "--cpu-slots", "0", "--quiet", "--no-report", *pool,
    ]  # fmt: skip


def one_run(
    folder: Path,
    slots: int,
    connections: int,
    sampler: str,
    finished: int,
    new: int,
    profile: Path | None = None,
    trial_seconds: tuple[float, float] = (0.0, 0.0),
    sampling_processes: int | None = None,
) -> dict[str, float]:
    run_dir = folder / "run"
    run_dir.mkdir()
    build_journal(run_dir / "optuna.journal", STUDY, finished)
    token = folder / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)  # hyperfleet refuses a token file other users may read
    port = _free_port()
    controller = subprocess.Popen(
        controller_command(
            run_dir, token, port, sampler, finished + new, profile, sampling_processes
        ),
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        stdout=subprocess.DEVNULL,
    )
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    finished = context.Value("i", 0)
    players = [
        context.Process(
            target=play_node,
            args=(("127.0.0.1", port), i, slots // connections, trial_seconds, results, finished),
        )
        for i in range(connections)
    ]
    for player in players:
        player.start()
    cpu_before = _cpu(controller.pid)
    marks = (new // 5, new - new // 5)
    outcomes, seen = _outcomes(results, len(players), finished, controller.pid, marks)
    steady, middle_end = seen
    cpu_after = _cpu(controller.pid)
    cpu = cpu_after - cpu_before
    controller.wait(timeout=60)
    for player in players:
        player.join()
    trials = sum(o[0] for o in outcomes)
    first = min(o[1] for o in outcomes if o[1])
    last = max(o[2] for o in outcomes)
    waits = sorted(w for o in outcomes for w in o[3])
    return {
        "trials": trials,
        "per_s": (trials - 1) / (last - first),
        "p50_ms": 1000 * statistics.median(waits),
        "p99_ms": 1000 * waits[int(0.99 * (len(waits) - 1))],
        "max_ms": 1000 * waits[-1],
        "cpu_ms": 1000 * cpu / trials,
        "after_fifth_cpu_ms": 1000 * (cpu_after - steady[0]) / max(1, trials - steady[1]),
        "steady_cpu_ms": 1000 * (middle_end[0] - steady[0]) / max(1, middle_end[1] - steady[1]),
        "sent_pct": 100 * sum(o[4] for o in outcomes) / trials,
    }


def _outcomes(
    results: Any, players: int, finished: Any, pid: int, marks: tuple[int, ...]
) -> tuple[list[Any], list[tuple[float, int]]]:
    """Every player's outcome, and for each of ``marks`` the controller's CPU seconds and the
    trials finished once that many trials had: between the first two, the steady state (past
    start-up, before the run's end)."""
    outcomes: list[Any] = []
    seen: list[tuple[float, int]] = []
    deadline = time.monotonic() + 900
    while len(outcomes) < players:
        if len(seen) < len(marks) and finished.value >= marks[len(seen)]:
            seen.append((_cpu(pid), finished.value))
        try:
            outcomes.append(results.get(timeout=0.05))
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError("the played nodes did not finish in 15 minutes") from None
    while len(seen) < len(marks):
        seen.append((_cpu(pid), finished.value))
    return outcomes, seen


def _cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--samplers", nargs="+", default=["random", "tpe"])
    parser.add_argument("--studies", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--new-trials", type=int, default=3000, help="random sampler")
    parser.add_argument("--new-tpe-trials", type=int, default=300)
    parser.add_argument(
        "--trial-seconds",
        type=float,
        default=0.0,
        help="each played trial returns this long after its last suggestion (default: at once)",
    )
    parser.add_argument(
        "--trial-spread",
        type=float,
        default=0.0,
        help="trials last --trial-seconds times 1 to 1 + this, at random (slots then drift apart "
        "as real trials do, instead of all ending together)",
    )
    parser.add_argument(
        "--sampling-processes",
        type=int,
        nargs="+",
        default=[-1],
        help="TPE's sampler processes beside the controller; several values alternate run by "
        "run (0: none; -1, the default: the run's default, none)",
    )
    parser.add_argument(
        "--profile", type=Path, help="profile the controller (one configuration) into this file"
    )
    args = parser.parse_args()
    print(f"{args.connections} agent connections; waits: from a slot's result to its next trial")
    print(
        f"{'sampler':<7} {'study':>6} {'slots':>5} {'pool':>4} {'trials/s':>9} {'wait p50':>9} "
        f"{'p99':>7} {'max ms':>7} {'ctl cpu ms/trial':>17} {'steady':>7} {'1/5-end':>8} "
        f"{'sent %':>7}"
    )
    for sampler in args.samplers:
        new = args.new_trials if sampler == "random" else args.new_tpe_trials
        for finished in args.studies:
            for slots, processes in itertools.product(args.slots, args.sampling_processes):
                # Every slot runs a few trials, so that each has waits to measure.
                r = one_run(
                    run_folder(),
                    slots,
                    args.connections,
                    sampler,
                    finished,
                    max(new, 2 * slots),
                    args.profile,
                    (args.trial_seconds, args.trial_spread),
                    None if processes < 0 else processes,
                )
                pool = "dflt" if processes < 0 else str(processes)
                print(
                    f"{sampler:<7} {finished:>6} {slots:>5} {pool:>4} {r['per_s']:>9.0f} "
                    f"{r['p50_ms']:>9.2f} {r['p99_ms']:>7.2f} {r['max_ms']:>7.1f} "
                    f"{r['cpu_ms']:>17.2f} {r['steady_cpu_ms']:>7.2f} "
                    f"{r['after_fifth_cpu_ms']:>8.2f} {r['sent_pct']:>7.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
