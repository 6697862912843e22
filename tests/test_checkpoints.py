"""Long trials survive interruption: a repeat continues from its own checkpoint, with the
curve its earlier attempts reported, after a kill, a crash or SIGTERM."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

import hyperfleet
from hyperfleet import client
from hyperfleet.config import RunSettings
from hyperfleet.controller.checkpoints import sweep
from hyperfleet.errors import ConfigError
from support.procs import (
    assert_no_leftovers,
    bench_script,
    cli_command,
    cpu_only_env,
    load_trials,
    run_cli,
    wait_until,
)

HERE = Path(__file__).resolve().parent
COUNTER = f"{HERE / 'objectives' / 'checkpointed.py'}:counter"
SCRIPT = HERE / "objectives" / "checkpointed_script.py"
KIND = "hyperfleet:fail_kind"
REASON = "hyperfleet:fail_reason"
RETRY_OF = "hyperfleet.retry_of"


def _env(folder: Path, **settings: str) -> dict[str, str]:
    return {**cpu_only_env(), "TEST_FOLDER": str(folder), **settings}


def _lines(folder: Path, event: str) -> list[list[str]]:
    text = (folder / "log").read_text() if (folder / "log").exists() else ""
    return [line.split()[1:] for line in text.splitlines() if line.startswith(event + " ")]


def _state(folder: Path) -> int:
    return int(json.loads((folder / "state.json").read_text())["next_step"])


def test_a_killed_controller_costs_at_most_one_checkpoint_interval_per_kill(
    tmp_path: Path,
) -> None:
    bench = bench_script("checkpoint_kills")
    plan = bench.Plan(n_trials=2, steps=12, every=3, step_seconds=0.05, slots=1)
    report = bench.kill_loop(tmp_path, kills=3, plan=plan, seed=1, max_between=5)
    # Whole curves, each repeat started at its chain's last checkpoint, in its chain's folder.
    assert report.problems == []
    assert report.kills == 3
    assert report.attempts > plan.n_trials  # the kills interrupted trials, which were repeated
    assert 0 <= report.wasted_steps <= report.kills * plan.every
    # --keep-checkpoints best (the default): only the best trial's folder is left, in best/.
    run_dir = tmp_path / "run"
    trials = load_trials(run_dir, bench.STUDY)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    winner = min(complete, key=lambda t: t.values[0])
    first = winner.user_attrs.get("hyperfleet.first_attempt", winner.number)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [str(first)]
    assert _state(run_dir / "best" / "checkpoint") == plan.steps


def _sigterm_command(tmp_path: Path, how: str) -> list[str]:
    common = ["--n-trials", "1", "--cpu-slots", "1", "--run-dir", str(tmp_path / "run")]
    common += ["--study-name", "s", "--plain", "--no-report", "--stop-grace", "60s"]
    if how == "function":
        return cli_command("run", COUNTER, *common)
    (tmp_path / "space.toml").write_text('[params.x]\ntype = "float"\nlow = 0.0\nhigh = 1.0\n')
    cmd = f"{sys.executable} {SCRIPT} {{x}}"
    return cli_command("run", "--cmd", cmd, "--space", str(tmp_path / "space.toml"), *common)


@pytest.mark.parametrize("how", ["function", "script"])
def test_sigterm_lets_a_trial_save_and_its_repeat_loses_no_step(tmp_path: Path, how: str) -> None:
    # No periodic checkpoint: only the one saved when should_stop says so.
    env = _env(tmp_path, CHECKPOINT_STEPS="12", CHECKPOINT_EVERY="1000", STEP_SECONDS="0.1")
    command = _sigterm_command(tmp_path, how)
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    wait_until(lambda: len(_lines(tmp_path, "step")) >= 3, 60, "three steps of the trial")
    sent = time.monotonic()
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 130
    assert time.monotonic() - sent < 30  # it stopped when asked, not at the 60s grace's end
    assert_no_leftovers(tmp_path / "run")
    stopped, queued = load_trials(tmp_path / "run", "s")  # its repeat waits for the next run
    assert stopped.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert stopped.system_attrs[KIND] == "interrupted"
    assert "stopped when asked to" in stopped.system_attrs[REASON]
    [[_, _, saved]] = _lines(tmp_path, "stopped")

    again = run_cli(command[3:], tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    trials = load_trials(tmp_path / "run", "s")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    repeat = trials[1]
    assert repeat.user_attrs[RETRY_OF] == 0 and repeat.params == stopped.params
    attempts = _lines(tmp_path, "attempt")
    assert [a[-1] for a in attempts] == ["0", saved]  # the repeat started where it saved
    assert attempts[0][2] == attempts[1][2]  # in the same folder
    assert len(_lines(tmp_path, "step")) == 12  # not one step run twice
    assert sorted(repeat.intermediate_values) == list(range(12))  # the whole curve


def test_a_crashed_script_is_retried_from_its_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "space.toml").write_text('[params.x]\ntype = "float"\nlow = 0.0\nhigh = 1.0\n')
    env = _env(tmp_path, CHECKPOINT_STEPS="6", CRASH_AT="3")
    args = ["run", "--cmd", f"{sys.executable} {SCRIPT} {{x}}", "--space", "space.toml"]
    args += ["--n-trials", "1", "--cpu-slots", "1", "--run-dir", "run", "--study-name", "s"]
    result = run_cli([*args, "--retry", "error=1", "--quiet", "--no-report"], tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    crashed, repeat = load_trials(tmp_path / "run", "s")
    assert crashed.state == TrialState.FAIL and crashed.system_attrs[KIND] == "error"
    assert repeat.state == TrialState.COMPLETE and repeat.user_attrs[RETRY_OF] == 0
    # The crash came after step 3's report and before its save: the repeat runs step 3 again,
    # and its second report of step 3 is no error.
    attempts = _lines(tmp_path, "attempt")
    assert [a[-1] for a in attempts] == ["0", "3"]
    assert attempts[0][2] == attempts[1][2] == str(tmp_path / "run" / "checkpoints" / "0")
    x = crashed.params["x"]
    assert repeat.intermediate_values == {s: x + 1.0 / (s + 1) for s in range(6)}


@pytest.mark.parametrize("keep", ["none", "all"])
def test_keep_checkpoints_decides_which_folders_stay(tmp_path: Path, keep: str) -> None:
    env = _env(tmp_path, CHECKPOINT_STEPS="2", STEP_SECONDS="0.01")
    args = ["run", COUNTER, "--n-trials", "3", "--cpu-slots", "1", "--run-dir", "run"]
    args += ["--study-name", "s", "--quiet", "--no-report", "--keep-checkpoints", keep]
    result = run_cli(args, tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == (["0", "1", "2"] if keep == "all" else [])
    assert (tmp_path / "run" / "best" / "checkpoint").is_dir() == (keep == "all")


def test_interrupting_itself_unasked_is_an_error_and_not_repeated(tmp_path: Path) -> None:
    target = f"{HERE / 'objectives' / 'checkpointed.py'}:interrupts_itself"
    args = ["run", target, "--n-trials", "1", "--cpu-slots", "1", "--run-dir", "run"]
    result = run_cli([*args, "--study-name", "s", "--quiet", "--no-report"], tmp_path)
    assert result.returncode == 1  # every trial failed
    [trial] = load_trials(tmp_path / "run", "s")
    assert trial.system_attrs[KIND] == "error"
    assert "should_stop" in trial.system_attrs[REASON]


def test_outside_hyperfleet_each_trial_gets_a_fresh_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_FOLDER", str(tmp_path))
    monkeypatch.setenv("CHECKPOINT_STEPS", "2")
    monkeypatch.setenv("STEP_SECONDS", "0")
    for name in (client.ADDRESS_ENV, client.CHECKPOINT_ENV):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("checkpointed", COUNTER.split(":")[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    study = optuna.create_study()
    study.optimize(module.counter, n_trials=3)
    attempts = _lines(tmp_path, "attempt")
    assert [a[-1] for a in attempts] == ["0", "0", "0"]  # nothing carried over
    folders = [Path(a[2]) for a in attempts]
    assert len(set(folders)) == 3
    gc.collect()
    assert not any(folder.exists() for folder in folders)  # gone with their trials
    # A script run by hand: a temporary folder, and the run never stops it.
    assert client.checkpoint_dir().is_dir() and not client.should_stop()
    assert hyperfleet.should_stop(optuna.trial.FixedTrial({})) is False
    assert os.path.isdir(hyperfleet.checkpoint_dir(optuna.trial.FixedTrial({})))


def test_an_unknown_keep_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="best, all, none"):
        RunSettings(keep_checkpoints="last")


def _trial(number: int, state: TrialState, **user_attrs: int) -> FrozenTrial:
    value = float(number) if state == TrialState.COMPLETE else None
    return FrozenTrial(
        number=number, state=state, value=value, datetime_start=None, datetime_complete=None,
        params={}, distributions={}, user_attrs=user_attrs, system_attrs={},
        intermediate_values={}, trial_id=number,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("keep", "left"),
    [("best", ["0", "4", "5"]), ("none", ["4", "5"]), ("all", ["0", "1", "2", "4", "5"])],
)
def test_a_sweep_removes_only_ended_chains_the_policy_does_not_keep(
    tmp_path: Path, keep: str, left: list[str]
) -> None:
    trials = [
        _trial(0, TrialState.COMPLETE),  # the best
        _trial(1, TrialState.PRUNED),
        _trial(2, TrialState.FAIL),  # interrupted, then completed by its repeat, trial 3
        _trial(3, TrialState.COMPLETE, **{RETRY_OF: 2, "hyperfleet.first_attempt": 2}),
        _trial(4, TrialState.FAIL),  # failed for good: a later --retry may continue it
        _trial(5, TrialState.RUNNING),
    ]
    for name in ("0", "1", "2", "4", "5"):
        (tmp_path / name).mkdir()
    sweep(tmp_path, trials, keep, best={0})
    assert sorted(p.name for p in tmp_path.iterdir()) == left
