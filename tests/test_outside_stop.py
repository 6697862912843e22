"""The job's end from outside: ``scancel``, a time limit or a preemption sends SIGTERM to every
process of the job at once, workers and agents included, in no set order. The trials it ends
are interrupted (run again, never counted), whichever process hears it first; a worker killed
by hand while the run goes on is still a crash."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil
import pytest
from optuna.trial import FrozenTrial, TrialState

from support.background import BackgroundRun, started
from support.nodes import Agent, free_port, node_processes, start_controller
from support.procs import (
    WORKER_MODULE,
    assert_no_leftovers,
    cpu_only_env,
    load_trials,
    objective,
    run_cli,
    wait_until,
)

KIND = "hyperfleet:fail_kind"
RETRY_OF = "hyperfleet.retry_of"


def _args(run_dir: Path) -> list[str]:
    return [
        "run", objective("waits_for_release"), "--run-dir", str(run_dir), "--study-name", "s",
        "--n-trials", "4", "--cpu-slots", "2", "--plain", "--no-report",
    ]  # fmt: skip


def _workers_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children() if WORKER_MODULE in " ".join(p.cmdline())]


def _terminate_and_wait(processes: list[psutil.Process]) -> None:
    for process in processes:
        # Its agent, stopped first, may have ended it already.
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGTERM)
    psutil.wait_procs(processes, timeout=10)


def _kinds(trials: list[FrozenTrial]) -> list[str]:
    return [str(t.system_attrs.get(KIND)) for t in trials if t.state == TrialState.FAIL]


@pytest.mark.parametrize("first", ["workers", "controller"])
def test_the_jobs_end_interrupts_running_trials_whoever_hears_it_first(
    tmp_path: Path, first: str
) -> None:
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    run = BackgroundRun(_args(tmp_path / "run"), tmp_path, env)
    try:
        wait_until(lambda: started(tmp_path) == 2, 60, "both slots to start a trial")
        workers = _workers_of(run.process.pid)
        assert len(workers) == 2
        if first == "workers":  # their deaths reach the controller before its own SIGTERM
            _terminate_and_wait(workers)
            run.process.send_signal(signal.SIGTERM)
        else:
            run.process.send_signal(signal.SIGTERM)
            wait_until(lambda: "stopping (SIGTERM)" in run.stdout, 30, "the controller's stop")
            _terminate_and_wait(workers)
        assert run.wait() == 130, run.stderr
    finally:
        run.stop()
    assert_no_leftovers(tmp_path / "run")
    stopped = load_trials(tmp_path / "run", "s")
    assert _kinds(stopped) == ["interrupted", "interrupted"]
    failed = [t for t in stopped if t.state == TrialState.FAIL]
    assert all("the job's end" in t.system_attrs["hyperfleet:fail_reason"] for t in failed)

    # Submitted again, the search repeats them and ends at its budget, each trial once.
    (tmp_path / "release").touch()
    again = run_cli(_args(tmp_path / "run"), tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    trials = load_trials(tmp_path / "run", "s")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert sorted(t.user_attrs[RETRY_OF] for t in complete if RETRY_OF in t.user_attrs) == [0, 1]


def test_a_worker_killed_by_hand_while_the_run_goes_on_is_a_crash(tmp_path: Path) -> None:
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    run = BackgroundRun(_args(tmp_path / "run"), tmp_path, env)
    try:
        wait_until(lambda: started(tmp_path) == 2, 60, "both slots to start a trial")
        _terminate_and_wait(_workers_of(run.process.pid)[:1])
        failed = wait_until(
            lambda: [t for t in load_trials(tmp_path / "run", "s") if t.state == TrialState.FAIL],
            30,
            "the killed trial's end",
        )
        (tmp_path / "release").touch()
        assert run.wait() == 0, run.stderr
    finally:
        run.stop()
    assert _kinds(failed) == ["crash"]
    reason = failed[0].system_attrs["hyperfleet:fail_reason"]
    assert reason == "killed by signal SIGTERM, sent from outside hyperfleet while the run went on"
    trials = load_trials(tmp_path / "run", "s")
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 3 + ["FAIL"]  # it counted


def _running(run_dir: Path) -> list[FrozenTrial]:
    try:
        trials = load_trials(run_dir, "node_objective-where_it_runs")
    except KeyError:  # no study yet
        return []
    return [t for t in trials if t.state == TrialState.RUNNING]


def _node_workers(node: str) -> list[psutil.Process]:
    found = []
    for pid in node_processes(node):
        try:
            process = psutil.Process(pid)
            if WORKER_MODULE in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("first", ["workers", "agent"])
def test_a_node_stopped_from_outside_interrupts_its_trials_and_the_run_goes_on(
    tmp_path: Path, first: str
) -> None:
    """SIGTERM reaches a node's workers and its agent, in either order (the engine took the
    node back, or the job's end reached it first): its trials run again, on the node that
    joins next."""
    address = f"127.0.0.1:{free_port()}"
    controller = start_controller(tmp_path, address, 4)
    agents = [Agent(tmp_path, address, "a", gpus=2, nap=60)]
    try:
        wait_until(lambda: len(_node_workers("a")) == 2, 60, "node a's two workers")
        wait_until(lambda: len(_running(tmp_path / "run")) == 2, 30, "two trials on node a")
        workers = _node_workers("a")
        if first == "agent":
            os.kill(agents[0].process.pid, signal.SIGTERM)
        _terminate_and_wait(workers)
        os.kill(agents[0].process.pid, signal.SIGTERM)
        assert agents[0].wait(30) == 130
        agents.append(Agent(tmp_path, address, "b", gpus=2, nap=0.1))
        assert controller.wait(60) == 0, controller.stderr
    finally:
        for agent in agents:
            agent.stop()
        controller.stop()
    trials = load_trials(tmp_path / "run", "node_objective-where_it_runs")
    assert _kinds(trials) == ["interrupted", "interrupted"]
    reasons = {t.system_attrs["hyperfleet:fail_reason"] for t in trials if t.state.name == "FAIL"}
    assert any("node a" in r or "its node left" in r for r in reasons), reasons
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and {t.user_attrs["node"] for t in complete} == {"b"}
