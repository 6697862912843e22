"""Refit once, cached: ``--refit``, ``--refit-cmd``, ``--force-refit`` and ``optimize(refit=)``.

Every search runs real workers and every refit a real process; the refit functions and scripts
are written into ``tmp_path``. Each refit appends one line to ``calls.log`` (its path comes in
the environment), so a test can count how often it really ran.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest

import hyperfleet
from hyperfleet.app.cli import main as cli_main
from hyperfleet.resources.inventory import Inventory
from support.procs import cpu_only_env, run_cli

CALLS_ENV = "REFIT_TEST_CALLS"

# Minimizes -trial.number: every new trial is the best one, so a longer run changes the best.
TRAIN = """
import json, os

def objective(trial):
    trial.suggest_float("x", 0.0, 1.0)
    return -trial.number

def refit(params):
    with open(os.environ["REFIT_TEST_CALLS"], "a") as calls:
        calls.write(os.getcwd() + "\\n")
    with open("model.txt", "w") as model:
        model.write(json.dumps(params))
    slot = json.loads(os.environ["HYPERFLEET_SLOT"])
    return {
        "x": params["x"],
        "slot": slot["name"],
        "slot_cores": slot["cores"],
        "cores": sorted(os.sched_getaffinity(0)),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "trial_number": os.environ.get("HYPERFLEET_TRIAL_NUMBER"),
    }

def broken_refit(params):
    raise ValueError(f"cannot fit x={params['x']:.2f}")
"""

FIT_SCRIPT = """
import argparse, json, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float)
parser.add_argument("--out")
parser.add_argument("--fail", action="store_true")
args = parser.parse_args()
with open(os.environ["REFIT_TEST_CALLS"], "a") as calls:
    calls.write(os.getcwd() + "\\n")
if args.fail:
    print("disk full while saving", file=sys.stderr)
    sys.exit(3)
with open(args.out, "w") as out:
    json.dump({"x": args.x, "env": json.loads(os.environ["HYPERFLEET_PARAMS"])}, out)
print(json.dumps({"value": args.x}))
"""

SPACE = """
[params.x]
type = "float"
low = 0.0
high = 1.0
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text(textwrap.dedent(TRAIN))
    return tmp_path


def env_for(project: Path, **extra: str) -> dict[str, str]:
    return {**cpu_only_env(), CALLS_ENV: str(project / "calls.log"), **extra}


def search(project: Path, n_trials: int, *flags: str, env: dict[str, str] | None = None) -> Any:
    return run_cli(
        [
            "run", "train.py:objective", "--n-trials", str(n_trials), "--cpu-slots", "2",
            "--run-dir", "run", "--no-report", "--plain", "--seed", "1", *flags,
        ],
        cwd=project,
        env=env or env_for(project),
    )  # fmt: skip


def calls(project: Path) -> list[str]:
    log = project / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def best_params(project: Path) -> dict[str, Any]:
    return dict(json.loads((project / "run" / "best" / "params.json").read_text()))


def refit_dir(project: Path) -> Path:
    return project / "run" / "best" / "refit"


def test_refit_runs_once_then_is_skipped_until_forced(project: Path) -> None:
    first = search(project, 2, "--refit", "train.py:refit")

    assert first.returncode == 0, first.stderr
    folder = refit_dir(project)
    assert calls(project) == [str(folder)]  # it ran once, in best/refit/
    params = best_params(project)
    assert json.loads((folder / "model.txt").read_text()) == params
    result = json.loads((folder / "result.json").read_text())
    assert result["params"] == params
    assert result["trial"] == 1
    assert result["value"]["x"] == params["x"]
    assert result["value"]["trial_number"] == "1"
    assert result["finished"]
    cache = json.loads((folder / "refit.json").read_text())
    assert (cache["target"], cache["params"]) == ("train.py:refit", params)
    assert "refit done" in first.stdout
    model_written = (folder / "model.txt").stat().st_mtime_ns

    again = search(project, 2, "--refit", "train.py:refit")

    assert again.returncode == 0, again.stderr
    assert calls(project) == [str(folder)]
    assert (folder / "model.txt").stat().st_mtime_ns == model_written
    skipped = [line for line in again.stdout.splitlines() if "refit skipped" in line]
    assert len(skipped) == 1
    assert skipped[0].endswith(
        f"refit skipped: best parameters unchanged since {cache['finished']}; "
        "--force-refit to run it again"
    )

    forced = search(project, 2, "--refit", "train.py:refit", "--force-refit")

    assert forced.returncode == 0, forced.stderr
    assert calls(project) == [str(folder)] * 2
    assert json.loads((folder / "model.txt").read_text()) == params


def test_a_new_best_refits_again(project: Path) -> None:
    assert search(project, 2, "--refit", "train.py:refit").returncode == 0
    old = best_params(project)

    longer = search(project, 3, "--refit", "train.py:refit")

    assert longer.returncode == 0, longer.stderr
    new = best_params(project)
    assert new != old
    assert len(calls(project)) == 2
    assert json.loads((refit_dir(project) / "model.txt").read_text()) == new
    result = json.loads((refit_dir(project) / "result.json").read_text())
    assert (result["params"], result["trial"]) == (new, 2)


def test_another_refit_target_is_not_the_cached_one(project: Path) -> None:
    assert search(project, 2, "--refit", "train.py:refit").returncode == 0

    other_target = search(project, 2, "--refit", "train.py:broken_refit")

    # Same best parameters, another function: it runs (and fails, so nothing stays cached).
    assert other_target.returncode == 1
    assert "refit failed: ValueError" in other_target.stderr
    assert not (refit_dir(project) / "refit.json").exists()


def test_a_failing_refit_fails_the_run_and_caches_nothing(project: Path) -> None:
    failed = search(project, 2, "--refit", "train.py:broken_refit")

    assert failed.returncode == 1
    reason = f"refit failed: ValueError: cannot fit x={best_params(project)['x']:.2f}"
    assert reason in failed.stdout
    assert f"hyperfleet: run failed: {reason}" in failed.stderr
    folder = refit_dir(project)
    assert not (folder / "refit.json").exists()
    assert not (folder / "result.json").exists()
    assert "Traceback" in (folder / "stderr.log").read_text()

    again = search(project, 2, "--refit", "train.py:broken_refit")

    assert again.returncode == 1  # nothing was cached, so it is tried again
    assert reason in again.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--refit", "train.py:nope"], "defines no 'nope'"),
        (["--refit", "missing.py:refit"], "does not exist"),
        (["--refit", "no_such_module_here:refit"], "cannot be found"),
        (["--refit", "train.py"], "FILE.py:FUNCTION"),
        (["--refit-cmd", "python fit.py --x {x}"], "goes with --cmd and --space"),
        (["--force-refit"], "--force-refit goes with --refit or --refit-cmd"),
        (["--refit", "train.py:refit", "--refit-cmd", "python fit.py"], "not both"),
    ],
)
def test_bad_refit_input_exits_2_before_anything_is_written(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(project)
    args = ["run", "train.py:objective", "--n-trials", "2", "--run-dir", "run", *flags]

    assert cli_main(args) == 2

    assert message in capsys.readouterr().err
    assert not (project / "run").exists()


def test_a_refit_command_placeholder_must_be_a_parameter(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "space.toml").write_text(SPACE)
    monkeypatch.chdir(project)
    args = [
        "run", "--cmd", "python fit.py --x {x}", "--space", "space.toml", "--run-dir", "run",
        "--refit-cmd", "python fit.py --x {lr}",
    ]  # fmt: skip

    assert cli_main(args) == 2

    assert "uses {lr}, which is no parameter" in capsys.readouterr().err
    assert not (project / "run").exists()


def command_search(project: Path, refit_cmd: str) -> Any:
    (project / "fit.py").write_text(textwrap.dedent(FIT_SCRIPT))
    (project / "space.toml").write_text(SPACE)
    python = shlex.quote(sys.executable)
    return run_cli(
        [
            "run", "--cmd", f"{python} fit.py --x {{x}} --out trial.json", "--space",
            "space.toml", "--n-trials", "2", "--cpu-slots", "2", "--run-dir", "run",
            "--no-report", "--plain", "--refit-cmd", refit_cmd.replace("PYTHON", python),
        ],
        cwd=project,
        env=env_for(project),
    )  # fmt: skip


def test_refit_cmd_fills_in_the_best_parameters(project: Path) -> None:
    done = command_search(project, "PYTHON fit.py --x {x} --out model.json")

    assert done.returncode == 0, done.stderr
    params = best_params(project)
    # Two trials ran the script in their folders, then the refit once in best/refit/.
    assert calls(project)[-1] == str(refit_dir(project))
    assert len(calls(project)) == 3
    model = json.loads((refit_dir(project) / "model.json").read_text())
    assert model == {"x": params["x"], "env": params}
    result = json.loads((refit_dir(project) / "result.json").read_text())
    assert result["value"]["exit_status"] == 0
    assert '{"value":' in (refit_dir(project) / "stdout.log").read_text()


def test_a_failing_refit_cmd_fails_the_run_with_its_status(project: Path) -> None:
    failed = command_search(project, "PYTHON fit.py --x {x} --fail")

    assert failed.returncode == 1
    assert (
        "refit failed: the command exited with status 3; the last line of its stderr: "
        "disk full while saving"
    ) in failed.stderr
    assert not (refit_dir(project) / "refit.json").exists()


def test_the_refit_runs_pinned_to_the_first_slot(project: Path) -> None:
    env = env_for(project, HYPERFLEET_FAKE_GPUS="2")
    del env["CUDA_VISIBLE_DEVICES"]

    done = search(project, 2, "--refit", "train.py:refit", "--cpu-slots", "0", env=env)

    assert done.returncode == 0, done.stderr
    value = json.loads((refit_dir(project) / "result.json").read_text())["value"]
    assert value["slot"] == "gpu0#0"
    assert value["cuda"] == "GPU-fake-0"
    assert value["cores"] == value["slot_cores"]
    assert value["threads"] == str(len(value["slot_cores"]))


def test_optimize_refits_with_a_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "refit_api_train.py").write_text(textwrap.dedent(TRAIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(CALLS_ENV, str(tmp_path / "calls.log"))
    train = importlib.import_module("refit_api_train")
    cores = tuple(sorted(os.sched_getaffinity(0)))
    pool: dict[str, Any] = {
        "inventory": Inventory(gpus=(), cores=cores),
        "cpu_slots": 2,
        "run_dir": tmp_path / "run",
        "display": "quiet",
        "report": False,
    }
    study = optuna.create_study()

    outcome = hyperfleet.optimize(study, train.objective, n_trials=2, refit=train.refit, **pool)

    assert outcome.status == "completed"
    folder = tmp_path / "run" / "best" / "refit"
    assert json.loads((folder / "model.txt").read_text()) == study.best_params
    assert json.loads((folder / "refit.json").read_text())["target"] == ("refit_api_train:refit")

    failed = hyperfleet.optimize(
        study, train.objective, n_trials=2, refit=train.broken_refit, force_refit=True, **pool
    )

    assert failed.status == "failed"
    assert failed.message.startswith("refit failed: ValueError: cannot fit")


def test_a_multi_objective_study_skips_the_refit(project: Path) -> None:
    (project / "two.py").write_text(
        textwrap.dedent(
            """
            def objective(trial):
                x = trial.suggest_float("x", 0.0, 1.0)
                return x, 1 - x
            """
        )
    )

    done = run_cli(
        [
            "run", "two.py:objective", "--direction", "minimize", "--direction", "minimize",
            "--n-trials", "2", "--cpu-slots", "2", "--run-dir", "run", "--no-report",
            "--plain", "--refit", "train.py:refit",
        ],
        cwd=project,
        env=env_for(project),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "refit skipped: the study has several objectives" in done.stdout
    assert calls(project) == []
