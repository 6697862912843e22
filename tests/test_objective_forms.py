"""Every way a user writes an objective works: a function in the user's own script (under
``if __name__ == "__main__":``), one typed at an interactive prompt, a closure, a lambda, a file
or module target, and a factory. Module-level code runs once per warm worker."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

import hyperfleet
from hyperfleet.app.cli import main, objective_kwargs
from hyperfleet.resources.inventory import Inventory
from support.procs import load_trials, run_cli

ALLOWED_CORES = tuple(sorted(os.sched_getaffinity(0)))
SCRIPT_SECONDS = 120

# Module-level code logs each process that runs it; the objective records its worker.
COUNTED_MODULE = """\
import os
from pathlib import Path

with open(Path(__file__).with_name("imports.log"), "a") as log:
    log.write(f"{os.getpid()} {__name__}\\n")


def objective(trial):
    trial.set_user_attr("pid", os.getpid())
    return (trial.suggest_float("x", -1.0, 1.0) - 0.5) ** 2
"""

USER_SCRIPT = (
    COUNTED_MODULE
    + """

if __name__ == "__main__":
    import json

    import optuna

    import hyperfleet
    from hyperfleet.resources.inventory import Inventory

    study = optuna.create_study()
    cores = tuple(sorted(os.sched_getaffinity(0)))
    outcome = hyperfleet.optimize(
        study,
        objective,
        n_trials=6,
        run_dir=Path(__file__).with_name("run"),
        display="quiet",
        inventory=Inventory(gpus=(), cores=cores),
        cpu_slots=2,
    )
    summary = {
        "status": outcome.status,
        "states": [t.state.name for t in study.trials],
        "trial_pids": [t.user_attrs["pid"] for t in study.trials],
    }
    Path(__file__).with_name("summary.json").write_text(json.dumps(summary))
"""
)

INTERACTIVE_SESSION = """\
import json, os, sys
import optuna
import hyperfleet
from hyperfleet.resources.inventory import Inventory

def objective(trial):
    return trial.suggest_float("x", 0.0, 1.0) + OFFSET

OFFSET = 10.0
study = optuna.create_study()
hyperfleet.optimize(
    study, objective, n_trials=2, run_dir=sys.argv[1], display="quiet",
    inventory=Inventory(gpus=(), cores=(min(os.sched_getaffinity(0)),)), cpu_slots=1,
)
print(json.dumps([[t.state.name, t.value] for t in study.trials]))
"""


def cpu_pool(slots: int) -> dict[str, Any]:
    return {"inventory": Inventory(gpus=(), cores=ALLOWED_CORES), "cpu_slots": slots}


def import_log(folder: Path) -> list[tuple[int, str]]:
    rows = [line.split() for line in (folder / "imports.log").read_text().splitlines()]
    return [(int(pid), name) for pid, name in rows]


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SCRIPT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_objective_in_the_users_own_script(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    run_python([str(script)], cwd=tmp_path)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["states"] == ["COMPLETE"] * 6
    runs = import_log(tmp_path)
    # The script's top level ran in the controller as __main__, and once in each worker, which
    # re-runs it (as multiprocessing's spawn does) without entering the __main__ block.
    controllers = [pid for pid, name in runs if name == "__main__"]
    workers = [pid for pid, name in runs if name != "__main__"]
    assert len(controllers) == 1
    # Six trivial trials can all finish before the second worker has imported the script (it
    # is then shut down), so one or two workers ran it; each ran it once, whatever it ran.
    assert 1 <= len(workers) == len(set(workers)) <= 2
    assert set(summary["trial_pids"]) <= set(workers)
    assert controllers[0] not in workers


def test_objective_defined_at_an_interactive_prompt(tmp_path: Path) -> None:
    # `python -c` has a __main__ without a file, like a notebook: the objective and the globals
    # it uses travel by value.
    result = run_python(["-c", INTERACTIVE_SESSION, str(tmp_path / "run")], cwd=tmp_path)

    trials = json.loads(result.stdout.splitlines()[-1])
    assert [state for state, _ in trials] == ["COMPLETE", "COMPLETE"]
    assert all(10.0 <= value <= 11.0 for _, value in trials)


def test_module_level_code_runs_once_per_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "counted.py").write_text(COUNTED_MODULE)
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "0")
    code = main(
        [
            *("run", f"{tmp_path / 'counted.py'}:objective", "--n-trials", "8"),
            *("--cpu-slots", "2", "--run-dir", str(tmp_path / "run"), "--quiet"),
        ]
    )

    assert code == 0
    study = optuna.load_study(
        study_name="counted-objective",
        storage=JournalStorage(JournalFileBackend(str(tmp_path / "run" / "optuna.journal"))),
    )
    trial_pids = Counter(t.user_attrs["pid"] for t in study.get_trials())
    runs = import_log(tmp_path)
    # Each worker imported the file once (never the controller) and then ran trial after
    # trial. The second worker may be shut down before it got there if the first one ran all
    # eight trivial trials while it started.
    assert 1 <= len(runs) == len({pid for pid, _ in runs}) <= 2
    assert {name for _, name in runs} == {"counted"}
    assert {pid for pid, _ in runs} >= set(trial_pids)
    assert os.getpid() not in trial_pids
    assert trial_pids.total() == 8


def test_module_target_is_found_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "counted.py").write_text(COUNTED_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "0")

    code = main(["run", "counted:objective", "--n-trials", "2", "--cpu-slots", "1", "--quiet"])

    assert code == 0
    result = json.loads((tmp_path / "runs/counted-objective/trials/00001/result.json").read_text())
    assert result["state"] == "COMPLETE"


def test_closure_and_lambda_objectives(tmp_path: Path) -> None:
    offset = 100.0  # captured: the closure travels by value

    def closure(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0.0, 1.0) + offset

    for name, objective in [("closure", closure), ("lambda", lambda t: t.suggest_int("n", 3, 3))]:
        study = optuna.create_study()
        outcome = hyperfleet.optimize(
            study, objective, n_trials=3, run_dir=tmp_path / name, display="quiet", **cpu_pool(2)
        )
        assert outcome.status == "completed"
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
        low, high = (100.0, 101.0) if name == "closure" else (3.0, 3.0)
        assert all(low <= (t.value or -1.0) <= high for t in study.trials)


def test_factory_objective_gets_its_keyword_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = textwrap.dedent(
        """\
        import os

        def make_objective(scale):
            def objective(trial):
                trial.set_user_attr("pid", os.getpid())
                return scale * trial.suggest_float("x", 1.0, 2.0)
            return objective
        """
    )
    (tmp_path / "forms_factory.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "forms_factory", raising=False)
    factory = importlib.import_module("forms_factory")
    study = optuna.create_study()
    hyperfleet.optimize(
        study,
        factory.make_objective,
        n_trials=3,
        run_dir=tmp_path / "run",
        display="quiet",
        objective_kwargs={"scale": -1.0},
        **cpu_pool(1),
    )

    assert all(-2.0 <= (t.value or 0.0) <= -1.0 for t in study.trials)


# A plugin module, loaded from its file under a name no import statement finds.
PLUGIN_MODULE = """\
import os
from pathlib import Path

with open(Path(__file__).with_name("imports.log"), "a") as log:
    log.write(f"{os.getpid()} {__name__}\\n")

SHIFT = 5.0


def shifted(x):
    return x + SHIFT


def objective(trial):
    return shifted(trial.suggest_float("x", 0.0, 1.0))


def make_closure(base):
    def closure(trial):
        return shifted(trial.suggest_float("x", 0.0, 1.0)) + base

    return closure
"""

PLUGIN_DRIVER = """\
import importlib.util, json, os, sys, types
import optuna
import hyperfleet
from hyperfleet.resources.inventory import Inventory

spec = importlib.util.spec_from_file_location("loaded_plugin", sys.argv[1])
plugin = importlib.util.module_from_spec(spec)
sys.modules["loaded_plugin"] = plugin
spec.loader.exec_module(plugin)

# A module that exists only in memory: no file to import it from in a worker.
in_memory = types.ModuleType("in_memory_plugin")
sys.modules["in_memory_plugin"] = in_memory
exec("K = 7.0\\ndef objective(t):\\n    return t.suggest_float('x', 0, 1) + K", vars(in_memory))

results = {}
for name, objective in [
    ("function", plugin.objective),
    ("closure", plugin.make_closure(100.0)),
    ("in_memory", in_memory.objective),
]:
    study = optuna.create_study()
    outcome = hyperfleet.optimize(
        study, objective, n_trials=2, run_dir=os.path.join(sys.argv[2], name), display="quiet",
        report=False, inventory=Inventory(gpus=(), cores=(min(os.sched_getaffinity(0)),)),
        cpu_slots=1,
    )
    results[name] = [outcome.status, [t.value for t in study.trials]]
print(json.dumps(results))
"""

STDIN_SCRIPT = """\
import json, os, sys
import optuna
import hyperfleet
from hyperfleet.resources.inventory import Inventory

OFFSET = 3.0


def objective(trial):
    return trial.suggest_float("x", 0.0, 1.0) + OFFSET


if __name__ == "__main__":
    study = optuna.create_study()
    outcome = hyperfleet.optimize(
        study, objective, n_trials=2, run_dir="run", display="quiet", report=False,
        inventory=Inventory(gpus=(), cores=(min(os.sched_getaffinity(0)),)), cpu_slots=1,
    )
    print(json.dumps([outcome.status, [t.value for t in study.trials]]))
"""


def test_objective_from_a_module_loaded_from_its_file(tmp_path: Path) -> None:
    # As plugin loaders and pytest's importlib mode do: the module is in sys.modules under a
    # name that a fresh worker cannot import, so workers import the file under that name.
    plugin = tmp_path / "plugins" / "objectives.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN_MODULE)
    (tmp_path / "drive.py").write_text(PLUGIN_DRIVER)
    result = run_python(["drive.py", str(plugin), str(tmp_path / "runs")], cwd=tmp_path)

    results = json.loads(result.stdout.splitlines()[-1])
    assert {name: status for name, (status, _) in results.items()} == {
        "function": "completed",
        "closure": "completed",
        "in_memory": "completed",
    }
    # Each value went through the module's globals: SHIFT, and K of the in-memory module.
    ranges = {"function": (5.0, 6.0), "closure": (105.0, 106.0), "in_memory": (7.0, 8.0)}
    for name, (_, values) in results.items():
        low, high = ranges[name]
        assert len(values) == 2 and all(low <= v <= high for v in values), (name, values)
    runs = import_log(plugin.parent)
    assert {name for _, name in runs} == {"loaded_plugin"}
    # The driver loaded it once; the worker of each of the two searches that used it, once.
    assert len(runs) == 3


def test_script_piped_on_stdin(tmp_path: Path) -> None:
    # `python - < search.py`: __main__ has no file a worker could re-run, so the objective and
    # the globals it uses travel by value.
    result = subprocess.run(
        [sys.executable, "-"],
        input=STDIN_SCRIPT,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SCRIPT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    status, values = json.loads(result.stdout.splitlines()[-1])
    assert status == "completed"
    assert len(values) == 2 and all(3.0 <= v <= 4.0 for v in values)


FACTORIES = """\
def make_objective(dataset, scale=1):
    def objective(trial):
        trial.set_user_attr("dataset", dataset)
        trial.set_user_attr("scale", scale)
        return scale * trial.suggest_float("x", 0.0, 1.0)

    return objective


def make_without_arguments():
    return make_objective("iris")


def make_seeded(dataset, *, seed):
    return make_objective(dataset, seed)
"""


def factory_search(folder: Path, target: str, *flags: str) -> list[str]:
    (folder / "search.py").write_text(FACTORIES)
    return [
        *("run", f"search.py:{target}", *flags, "--n-trials", "2", "--cpu-slots", "1"),
        *("--run-dir", "run", "--no-report", "--quiet"),
    ]


def test_factory_target_without_its_arguments_fails_each_trial_saying_how_to_pass_them(
    tmp_path: Path,
) -> None:
    # make_objective(dataset) takes one argument, as an objective does: only the run shows
    # that it returns a function instead of a value.
    result = run_cli(factory_search(tmp_path, "make_objective"), cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    trials = load_trials(tmp_path / "run", "search-make_objective")
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    for trial in trials:
        assert trial.system_attrs["hyperfleet:fail_kind"] == "error"
        reason = trial.system_attrs["hyperfleet:fail_reason"]
        assert "make_objective returned the function make_objective.<locals>.objective" in reason
        assert "--objective-arg NAME=VALUE" in reason


def test_factory_target_gets_its_objective_args(tmp_path: Path) -> None:
    flags = ("--objective-arg", "dataset=wine", "--objective-arg", "scale=2")
    result = run_cli(factory_search(tmp_path, "make_objective", *flags), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    trials = load_trials(tmp_path / "run", "search-make_objective")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [(t.user_attrs["dataset"], t.user_attrs["scale"]) for t in trials] == [("wine", 2)] * 2
    assert all(0.0 <= (t.value or -1.0) <= 2.0 for t in trials)


def test_objective_arg_values_are_literals_else_strings() -> None:
    flags = ["n=3", "lr=1e-3", "flag=true", "name=higgs", 'words="a b"', "sizes=[1, 2]"]
    flags += ["table={depth = 2}", "padded=007", "empty="]

    assert objective_kwargs(flags) == {
        **{"n": 3, "lr": 1e-3, "flag": True, "name": "higgs", "words": "a b"},
        **{"sizes": [1, 2], "table": {"depth": 2}, "padded": "007", "empty": ""},
    }


@pytest.mark.parametrize(
    ("target", "flags", "message"),
    [
        ("make_without_arguments", [], "takes no arguments, but an objective takes the trial"),
        ("make_seeded", [], "needs 2 arguments (dataset, seed)"),
        ("make_objective", ["--objective-arg", "dataset"], "write NAME=VALUE"),
        ("make_objective", ["--objective-arg", "datset=wine"], "no parameter 'datset'"),
        ("make_seeded", ["--objective-arg", "dataset=wine"], "add --objective-arg seed=VALUE"),
    ],
)
def test_factory_target_mistakes_stop_before_anything_is_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)

    code = main(factory_search(tmp_path, target, *flags))

    assert code == 2
    error = capsys.readouterr().err
    assert message in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
