"""A failing trial fails alone: its reason is recorded, its slot gets a fresh worker, the search
goes on, and nothing it started is left running.

The cases that share their flags run in one search (``fails_in_turn``: trial 2k fails as case k,
trial 2k+1 follows on a fresh worker), so each kind of failure costs one worker start, not one
whole run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from optuna.trial import FrozenTrial, TrialState

from support.objectives import STDERR_LINE
from support.procs import assert_no_leftovers, cpu_only_env, load_trials, objective, run_cli

KIND = "hyperfleet:fail_kind"
REASON = "hyperfleet:fail_reason"
SLOT = "hyperfleet:slot"
PID = "hyperfleet:worker_pid"


@dataclass(frozen=True)
class Case:
    function: str
    kind: str
    reason: str  # a piece of the recorded reason
    traceback: str = ""  # a piece of the traceback, when Python could write one
    flags: tuple[str, ...] = ()
    stderr: str = ""  # more the end of stderr must hold


CASES = [
    Case("raises", "error", "ValueError: boom from the objective", "ValueError"),
    Case("calls_sys_exit", "crash", "the objective called sys.exit(3)", "SystemExit"),
    Case("calls_os_exit", "crash", "exited with status 7"),
    Case("segfaults", "crash", "SIGSEGV", stderr="Fatal Python error: Segmentation fault"),
    Case("killed_from_outside", "crash", "SIGKILL"),
    Case("returns_none", "error", "returned None"),
    Case("returns_nan", "error", "returned NaN"),
    Case("returns_string", "error", "returned 'not a number', a string, not a number"),
    # Values that pass float() but that Optuna's tell refuses must fail the trial, not the run.
    Case("returns_numeric_string", "error", "returned '1.5', a string, not a number"),
    Case("returns_huge_int", "error", "a number too large for a float"),
    Case("returns_a_dict", "error", "a dict, not a number"),
    Case(
        "returns_string_among_two",
        "error",
        "returned '2.0', a string",
        flags=("--direction", "minimize", "--direction", "minimize"),
    ),
    # The controller tells every trial; an objective that tries is told so and fails alone.
    Case("tells_itself", "error", "trial.study.tell is not available", "RuntimeError"),
    Case(
        "returns_one_of_two",
        "error",
        "returned 1 value(s) but the study has 2 objective(s)",
        flags=("--direction", "minimize", "--direction", "minimize"),
    ),
    Case("returns_unsendable", "error", "cannot be sent back"),
    Case(
        "runs_too_long",
        "timeout",
        "per-trial limit of 1s",
        flags=("--trial-timeout", "1s", "--kill-grace", "1s"),
    ),
    Case("runs_out_of_memory", "oom", "CUDA out of memory", "OutOfMemoryError"),
]


def batches() -> dict[tuple[str, ...], list[Case]]:
    """The cases grouped by their flags: each group is one search."""
    groups: dict[tuple[str, ...], list[Case]] = {}
    for case in CASES:
        groups.setdefault(case.flags, []).append(case)
    return groups


@dataclass(frozen=True)
class Search:
    run_dir: Path
    trials: list[FrozenTrial]
    cases: list[Case]


@pytest.fixture(scope="module")
def search_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple[str, ...]], Search]:
    """The search of a group of cases, run when a test of the group first needs it."""
    done: dict[tuple[str, ...], Search] = {}

    def search(flags: tuple[str, ...]) -> Search:
        if flags not in done:
            folder = tmp_path_factory.mktemp("failures")
            done[flags] = _run_group(folder, flags, batches()[flags])
        return done[flags]

    return search


def _run_group(tmp_path: Path, flags: tuple[str, ...], cases: list[Case]) -> Search:
    run_dir = tmp_path / "run"
    n_trials = str(2 * len(cases))
    args = ["run", objective("fails_in_turn"), "--n-trials", n_trials, "--cpu-slots", "1"]
    env = {**cpu_only_env(), "FAILURES": ",".join(c.function for c in cases)}
    result = run_cli(
        [*args, "--plain", "--run-dir", str(run_dir), "--study-name", "s", *flags],
        tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_leftovers(run_dir)
    return Search(run_dir, load_trials(run_dir, "s"), cases)


@pytest.mark.parametrize("case", CASES, ids=[c.function for c in CASES])
def test_a_failing_trial_fails_alone(
    search_for: Callable[[tuple[str, ...]], Search], case: Case
) -> None:
    search = search_for(case.flags)
    number = 2 * search.cases.index(case)
    failed, after = search.trials[number], search.trials[number + 1]
    assert failed.state == TrialState.FAIL
    assert failed.system_attrs[KIND] == case.kind
    assert case.reason in failed.system_attrs[REASON]

    saved = json.loads((search.run_dir / "trials" / f"{number:05d}" / "result.json").read_text())
    assert saved["state"] == "FAIL"
    assert saved["fail_kind"] == case.kind
    assert case.reason in saved["reason"]
    assert STDERR_LINE in saved["stderr_tail"]
    assert case.stderr in saved["stderr_tail"]
    assert case.traceback in saved["traceback"]

    # The search went on, on the same slot, in a fresh worker.
    assert after.state == TrialState.COMPLETE
    assert after.system_attrs[SLOT] == failed.system_attrs[SLOT]
    assert after.system_attrs[PID] != failed.system_attrs[PID]
