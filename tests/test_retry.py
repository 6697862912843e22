"""Retries follow a per-reason policy, and workers are recycled after N trials."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.config import RetryPolicy
from hyperfleet.errors import ConfigError
from support.procs import assert_no_leftovers, load_trials, objective, run_cli

RETRY_OF = "hyperfleet.retry_of"
PID = "hyperfleet:worker_pid"


def test_retry_rules_parse() -> None:
    assert RetryPolicy.parse("crash=2, error=1").limits == {"crash": 2, "error": 1}
    assert RetryPolicy().limits == {}
    assert not RetryPolicy().allows("error", 0)
    assert RetryPolicy.parse("oom=1").allows("oom", 0)
    assert not RetryPolicy.parse("oom=1").allows("oom", 1)


def test_interrupted_trials_are_always_repeated_and_never_limited() -> None:
    assert RetryPolicy().allows("interrupted", 0)
    assert RetryPolicy().allows("interrupted", 1000)
    with pytest.raises(ConfigError, match="always run again"):
        RetryPolicy.parse("interrupted=1")


@pytest.mark.parametrize("text", ["crash=x", "bogus=1", "crash", "crash=-1"])
def test_bad_retry_rules_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="REASON=MAX"):
        RetryPolicy.parse(text)


def _run(tmp_path: Path, function: str, *flags: str) -> tuple[int, list[FrozenTrial]]:
    run_dir = tmp_path / "run"
    args = ["run", objective(function), "--cpu-slots", "1", "--plain", "--study-name", "s"]
    result = run_cli([*args, "--run-dir", str(run_dir), *flags], tmp_path)
    assert_no_leftovers(run_dir)
    return result.returncode, load_trials(run_dir, "s")


def test_a_crashing_trial_is_repeated_up_to_the_maximum(tmp_path: Path) -> None:
    code, trials = _run(tmp_path, "crashes_always", "--n-trials", "1", "--retry", "crash=2")
    # Every trial failed, so the run failed, after the original and two repeats.
    assert code == 1
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert [t.user_attrs.get(RETRY_OF) for t in trials] == [None, 0, 1]
    assert trials[1].params == trials[2].params == trials[0].params
    assert len({t.system_attrs[PID] for t in trials}) == 3


def test_exceptions_are_retried_only_when_asked(tmp_path: Path) -> None:
    code, trials = _run(tmp_path, "raises_always", "--n-trials", "1", "--retry", "error=1")
    assert code == 1
    assert [t.user_attrs.get(RETRY_OF) for t in trials] == [None, 0]


def test_exceptions_are_not_retried_by_default(tmp_path: Path) -> None:
    code, trials = _run(tmp_path, "raises_always", "--n-trials", "2")
    assert code == 1
    assert len(trials) == 2
    assert all(RETRY_OF not in t.user_attrs for t in trials)


def test_workers_are_recycled_after_max_trials_per_worker(tmp_path: Path) -> None:
    code, trials = _run(tmp_path, "quick", "--n-trials", "6", "--max-trials-per-worker", "2")
    assert code == 0
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    pids = [t.system_attrs[PID] for t in trials]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
    assert len({pids[0], pids[2], pids[4]}) == 3
