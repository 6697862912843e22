"""hyperfleet ``--ray`` against Ray Tune with ``OptunaSearch``, side by side on one Ray cluster.

    python bench/ray_tune_compare.py                         # the three measures, once each
    python bench/ray_tune_compare.py --measures rate,makespan --repeats 3

Needs Ray Tune: ``pip install 'ray[tune]'`` (the ``dev`` extra installs Ray alone).

One local Ray cluster (``ray.cluster_utils.Cluster``): a head and two worker nodes, 4 slots in
all (2, 1, 1). hyperfleet sees them as fake GPUs (``HYPERFLEET_FAKE_GPUS``, ``--cpu-slots 0``,
one agent per node placed by Ray); Ray Tune as CPUs (each trial asks for 1 CPU,
``max_concurrent_trials`` = 4). Both run the same objective, over the same space (x, y in
[-10, 10]), with Optuna's TPE sampler seeded alike, each as a command of its own started by
this script (``hyperfleet run ... --ray ADDRESS``; a Ray Tune driver, ``Tuner.fit``), one after
the other on the same cluster:

- ``rate``: trivial trials (return at once), trials per second from the first trial's start to
  the last one's end; start-up (launch to the first trial's start) apart;
- ``makespan``: the peers' 48 sleeping trials (``bench/makespan_durations.json``, in that
  order: trial k sleeps ``durations[k]`` seconds, times ``--scale``), span and wall over the
  lower bound ``max(sum / slots, longest)``;
- ``recovery``: ``--recovery-trials`` (3: one slot stays free for the lost trial) of
  ``--recovery-trial-s`` seconds; once a trial runs on a worker node, that node is removed (its
  processes killed, as a lost machine); the figure is the time from the removal to the last
  lost trial's start again elsewhere, and whether the search still ends with every trial
  completed. With more trials than free slots, it includes the wait for a slot. Ray Tune
  retries with ``FailureConfig(max_failures=3)`` (hyperfleet's default for a lost node is 3
  retries too); its trials save no checkpoints, as here they have nothing to save.

Every trial appends its start and end (wall clock, node) to a log file: the figures come from
there for both runners alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

THIS_FILE = Path(__file__).resolve()
DURATIONS: list[float] = json.loads((THIS_FILE.parent / "makespan_durations.json").read_text())
LOG_ENV = "BENCH_RAY_TUNE_LOG"  # the folder of the trials' logs, inherited by every Ray node
SCALE_ENV = "BENCH_RAY_TUNE_SCALE"
RECOVERY_ENV = "BENCH_RAY_TUNE_RECOVERY_S"
NODES = (2, 1, 1)  # slots of the head and of each worker node
SLOTS = sum(NODES)
SEED = 0
MAX_FAILURES = 3
KINDS = ("rate", "makespan", "recovery")


# --- what runs in a trial, for both runners ---------------------------------------------------


def _log(kind: str, line: str) -> None:
    # One short append per line: O_APPEND keeps concurrent writers' lines whole.
    with open(Path(os.environ[LOG_ENV]) / f"{kind}.log", "a") as out:
        out.write(line + "\n")


def work(kind: str, index: int, x: float, y: float, node: str) -> float:
    """The trial's work: log its start, sleep as its kind says, log its end."""
    key = f"{x!r},{y!r}"  # a retried trial has the same parameters
    _log(kind, f"start {index} {key} {time.time():.6f} {node}")
    if kind == "makespan":
        time.sleep(DURATIONS[index] * float(os.environ.get(SCALE_ENV, "1")))
    elif kind == "recovery":
        time.sleep(float(os.environ.get(RECOVERY_ENV, "8")))
    _log(kind, f"end {index} {key} {time.time():.6f} {node}")
    return (x - 2.0) ** 2 + (y + 1.0) ** 2


def _hyperfleet_trial(trial: optuna.Trial, kind: str) -> float:
    import hyperfleet

    x = trial.suggest_float("x", -10.0, 10.0)
    y = trial.suggest_float("y", -10.0, 10.0)
    node = hyperfleet.current_slot().name.partition("/")[0]  # ray-<node id>
    return work(kind, trial.number, x, y, node)


def rate(trial: optuna.Trial) -> float:
    return _hyperfleet_trial(trial, "rate")


def makespan(trial: optuna.Trial) -> float:
    return _hyperfleet_trial(trial, "makespan")


def recovery(trial: optuna.Trial) -> float:
    return _hyperfleet_trial(trial, "recovery")


def tune_trainable(config: dict[str, Any], kind: str) -> None:
    import ray
    from ray import tune

    # The search numbers trials from 1 in the order it creates them, in the trial's folder
    # name: <trainable>_<trial id>_<number>_<parameters>_<date>.
    context = tune.get_context()
    tag = Path(context.get_trial_dir()).name.split(f"{context.get_trial_id()}_", 1)[1]
    index = int(tag.split("_", 1)[0]) - 1
    node = f"ray-{ray.get_runtime_context().get_node_id()[:6]}"
    tune.report({"loss": work(kind, index, config["x"], config["y"], node)})


# --- the runners: each started as a command of its own ---------------------------------------


def hyperfleet_command(kind: str, n_trials: int, address: str, folder: Path) -> list[str]:
    return [
        sys.executable, "-m", "hyperfleet.app.cli", "run", f"{THIS_FILE}:{kind}",
        "--ray", address, "--run-dir", str(folder / "run"), "--study-name", kind,
        "--n-trials", str(n_trials), "--cpu-slots", "0", "--sampler", "tpe",
        "--seed", str(SEED), "--quiet", "--no-report",
    ]  # fmt: skip


def tune_command(
    kind: str, n_trials: int, address: str, folder: Path, reuse_actors: bool
) -> list[str]:
    command = [
        sys.executable, str(THIS_FILE), "--tune-driver", kind, "--address", address,
        "--n-trials", str(n_trials), "--out", str(folder / "tune.json"),
    ]  # fmt: skip
    return command + (["--reuse-actors"] if reuse_actors else [])


def tune_driver(kind: str, address: str, n_trials: int, out: Path, reuse_actors: bool) -> None:
    """A Ray Tune user's search: OptunaSearch with a seeded TPE, one CPU per trial."""
    import logging

    import optuna
    import ray
    from optuna.distributions import FloatDistribution
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    searcher = OptunaSearch(
        {"x": FloatDistribution(-10.0, 10.0), "y": FloatDistribution(-10.0, 10.0)},
        metric="loss",
        mode="min",
        sampler=optuna.samplers.TPESampler(seed=SEED),
    )
    trainable = tune.with_resources(tune.with_parameters(tune_trainable, kind=kind), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=n_trials,
            max_concurrent_trials=SLOTS,
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=kind,
            storage_path=str(out.parent / "tune"),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    grid = tuner.fit()
    completed = sum(
        1 for i in range(len(grid)) if grid[i].error is None and "loss" in grid[i].metrics
    )
    out.write_text(json.dumps({"completed": completed, "errors": grid.num_errors}))
    ray.shutdown()


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Event:
    start: bool
    index: int
    key: str
    at: float
    node: str


def read_log(path: Path) -> list[Event]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            events.append(Event(parts[0] == "start", int(parts[1]), parts[2], float(parts[3]),
                                parts[4]))  # fmt: skip
    return events


@dataclass
class Outcome:
    wall_s: float
    startup_s: float
    span_s: float
    completed: int
    extra: dict[str, Any] = field(default_factory=dict)


def completed_trials(runner: str, folder: Path, kind: str) -> int:
    if runner == "hyperfleet":
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(str(folder / "run" / "optuna.journal")))
        trials = optuna.load_study(study_name=kind, storage=storage).get_trials()
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    try:
        return int(json.loads((folder / "tune.json").read_text())["completed"])
    except (OSError, ValueError, KeyError):
        return 0


class Bench:
    def __init__(self, scale: float, recovery_s: float) -> None:
        from ray import cluster_utils

        self.logs = Path(tempfile.mkdtemp(prefix="ray-tune-compare-"))
        # Every node's processes inherit these: the trials' log folder, the agents' fake GPUs.
        os.environ[LOG_ENV] = str(self.logs)
        os.environ[SCALE_ENV] = str(scale)
        os.environ[RECOVERY_ENV] = str(recovery_s)
        os.environ["HYPERFLEET_FAKE_GPUS"] = str(max(NODES))
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        started = time.monotonic()
        self.cluster = cluster_utils.Cluster(
            initialize_head=True, head_node_args={"num_cpus": NODES[0], "num_gpus": NODES[0]}
        )
        for slots in NODES[1:]:
            self.cluster.add_node(num_cpus=slots, num_gpus=slots)
        self.cluster.wait_for_nodes()
        self.cluster_start_s = time.monotonic() - started

    def close(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.logs, ignore_errors=True)

    def run(self, runner: str, kind: str, n_trials: int, remove_node: bool = False) -> Outcome:
        log = self.logs / f"{kind}.log"
        log.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="ray-tune-compare-") as tmp:
            folder = Path(tmp)
            address = self.cluster.address
            if runner == "hyperfleet":
                command = hyperfleet_command(kind, n_trials, address, folder)
            else:
                command = tune_command(kind, n_trials, address, folder, runner == "tune-reuse")
            with open(folder / "output.txt", "w") as output:
                launch = time.time()
                process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
                extra = self._remove_a_node(log, process) if remove_node else {}
                try:
                    process.wait(timeout=600)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    extra["timed_out"] = True
                wall = time.time() - launch
            if process.returncode != 0:
                tail = (folder / "output.txt").read_text()[-1500:]
                print(f"{runner} {kind} exited with {process.returncode}:\n{tail}", flush=True)
            completed = completed_trials(runner.partition("-")[0], folder, kind)
        events = read_log(log)
        starts = [e.at for e in events if e.start]
        ends = [e.at for e in events if not e.start]
        if not starts or not ends:
            return Outcome(wall, float("nan"), float("nan"), completed, extra)
        if kind == "makespan":
            ran = sorted(e.index for e in events if not e.start)
            extra["all_48_in_order"] = ran == list(range(len(DURATIONS)))
        return Outcome(wall, min(starts) - launch, max(ends) - min(starts), completed, extra)

    def _remove_a_node(self, log: Path, process: subprocess.Popen[bytes]) -> dict[str, Any]:
        """Once a trial runs on a worker node, remove that node; then put a fresh one in its
        place, for the next runs. The times at which the lost trials start again."""
        workers = {f"ray-{node.node_id[:6]}": node for node in self.cluster.list_all_nodes()[1:]}

        def running() -> list[Event]:
            events = read_log(log)
            ended = {e.key for e in events if not e.start}
            return [e for e in events if e.start and e.node in workers and e.key not in ended]

        deadline = time.monotonic() + 300
        while not running() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not running():
            return {"removed": False}
        name = running()[0].node
        victim = workers[name]
        lost = [e for e in running() if e.node == name]
        removed_at = time.time()
        self.cluster.remove_node(victim, allow_graceful=False)
        deadline = time.monotonic() + 300
        again: dict[str, float] = {}
        while process.poll() is None and time.monotonic() < deadline and len(again) < len(lost):
            for event in read_log(log):
                if event.start and event.at > removed_at and event.key in {e.key for e in lost}:
                    again.setdefault(event.key, event.at - removed_at)
            time.sleep(0.05)
        self.cluster.add_node(num_cpus=NODES[-1], num_gpus=NODES[-1])
        self.cluster.wait_for_nodes()
        return {
            "removed": True,
            "lost": len(lost),
            "again": len(again),
            "recovery_s": max(again.values()) if len(again) == len(lost) else float("nan"),
        }


def fmt(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # nan: not measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measures", default=",".join(KINDS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rate-trials", type=int, default=200)
    parser.add_argument("--scale", type=float, default=1.0, help="times each makespan duration")
    parser.add_argument("--recovery-trials", type=int, default=SLOTS - 1)
    parser.add_argument("--recovery-trial-s", type=float, default=8.0)
    parser.add_argument(
        "--runners", default="hyperfleet,tune,tune-reuse",
        help="tune-reuse: Ray Tune with reuse_actors=True",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    # The Ray Tune driver, run by this script as a command of its own.
    parser.add_argument("--tune-driver", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--n-trials", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reuse-actors", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tune_driver:
        tune_driver(args.tune_driver, args.address, args.n_trials, args.out, args.reuse_actors)
        return

    import ray

    # A SIGTERM ends the benchmark as an exception would: the Ray cluster is shut down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    runners = args.runners.split(",")
    bench = Bench(args.scale, args.recovery_trial_s)
    results: dict[str, dict[str, list[Outcome]]] = {}
    try:
        print(f"Ray {ray.__version__}; a local cluster of {len(NODES)} nodes ({SLOTS} slots) "
              f"started in {bench.cluster_start_s:.1f} s", flush=True)  # fmt: skip
        for kind in args.measures.split(","):
            n_trials = {"rate": args.rate_trials, "makespan": len(DURATIONS)}.get(
                kind, args.recovery_trials
            )
            for repeat in range(args.repeats):
                for runner in runners:  # alternated, so drift hits all alike
                    outcome = bench.run(runner, kind, n_trials, remove_node=kind == "recovery")
                    results.setdefault(kind, {}).setdefault(runner, []).append(outcome)
                    print(f"{kind} {repeat + 1} {runner}: {outcome}", flush=True)
    finally:
        bench.close()
    report(results, args)


def report(results: dict[str, dict[str, list[Outcome]]], args: argparse.Namespace) -> None:
    def median(runs: list[Outcome], key: str) -> float:
        return statistics.median(getattr(o, key) for o in runs)

    summary: dict[str, Any] = {}
    if "rate" in results:
        print(f"\nrate: {args.rate_trials} trivial trials, TPE, {SLOTS} slots, "
              f"median of {args.repeats}")  # fmt: skip
        print(f"{'runner':<12}{'trials/s':>10}{'span s':>8}{'start-up s':>12}{'wall s':>8}"
              f"{'completed':>11}")  # fmt: skip
        for runner, runs in results["rate"].items():
            span, startup, wall = (median(runs, k) for k in ("span_s", "startup_s", "wall_s"))
            done = min(o.completed for o in runs)
            print(f"{runner:<12}{args.rate_trials / span:>10.1f}{span:>8.2f}{startup:>12.2f}"
                  f"{wall:>8.2f}{done:>11}")  # fmt: skip
            summary.setdefault("rate", {})[runner] = {
                "trials_per_s": args.rate_trials / span, "span_s": span,
                "startup_s": startup, "wall_s": wall, "completed": done,
            }  # fmt: skip
    if "makespan" in results:
        durations = [d * args.scale for d in DURATIONS]
        bound = max(sum(durations) / SLOTS, max(durations))
        print(f"\nmakespan: the 48 durations times {args.scale} ({sum(durations):.3f} s in all), "
              f"{SLOTS} slots, lower bound {bound:.3f} s, median of {args.repeats}")  # fmt: skip
        print(f"{'runner':<12}{'span s':>8}{'span/bound':>12}{'start-up s':>12}{'wall s':>8}"
              f"{'wall/bound':>12}{'completed':>11}")  # fmt: skip
        for runner, runs in results["makespan"].items():
            span, startup, wall = (median(runs, k) for k in ("span_s", "startup_s", "wall_s"))
            done = min(o.completed for o in runs)
            print(f"{runner:<12}{span:>8.2f}{span / bound:>12.2f}{startup:>12.2f}{wall:>8.2f}"
                  f"{wall / bound:>12.2f}{done:>11}")  # fmt: skip
            summary.setdefault("makespan", {})[runner] = {
                "span_s": span, "startup_s": startup, "wall_s": wall, "bound_s": bound,
                "completed": done,
            }  # fmt: skip
    if "recovery" in results:
        print(f"\nrecovery: {args.recovery_trials} trials of {args.recovery_trial_s} s, a worker "
              f"node removed (killed) while it runs one; seconds from the removal to the last "
              f"lost trial's start again")  # fmt: skip
        print(f"{'runner':<12}{'lost':>6}{'again':>7}{'recovery s':>12}{'completed':>11}"
              f"{'wall s':>8}  runs")  # fmt: skip
        for runner, runs in results["recovery"].items():
            times = [o.extra.get("recovery_s", float("nan")) for o in runs]
            lost = sum(o.extra.get("lost", 0) for o in runs)
            again = sum(o.extra.get("again", 0) for o in runs)
            done = min(o.completed for o in runs)
            shown = " ".join(fmt(t) for t in times)
            wall = median(runs, "wall_s")
            print(f"{runner:<12}{lost:>6}{again:>7}{fmt(statistics.median(times)):>12}"
                  f"{done:>5}/{args.recovery_trials:<5}{wall:>8.2f}  {shown}")  # fmt: skip
            summary.setdefault("recovery", {})[runner] = {
                "recovery_s": times, "lost": lost, "again": again, "completed": done,
            }  # fmt: skip
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
