"""Training scripts as objectives: CommandObjective, hyperfleet.client and ``run --cmd``.

The searches run real worker processes, which run real scripts written into ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import hyperfleet
from hyperfleet.app.cli import main as cli_main
from hyperfleet.errors import ConfigError
from hyperfleet.objective.command import CommandError, CommandObjective
from hyperfleet.sampling.space import SearchSpace, parse_space

PYTHON = shlex.quote(sys.executable)

CONDITIONAL_SPACE = """
[params.kind]
type = "categorical"
choices = ["plain", "boosted"]

[params.x]
type = "float"
low = 0.0
high = 10.0

[params.bonus]
type = "float"
low = 0.0
high = 1.0
when = { kind = "boosted" }
"""

# Reports x at every step, so a MedianPruner prunes the trials whose x is above the median.
# A pruned trial with x above 3.5 ignores the answer and hangs, to be terminated.
CLIENT_SCRIPT = """
import argparse, signal, sys
from hyperfleet import client

parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float)
parser.add_argument("--bonus", type=float, default=0.0)
args = parser.parse_args()
print("argv", sys.argv[1:])
for step in range(3):
    client.report(args.x, step)
    if client.should_prune():
        if args.x > 3.5:
            signal.pause()
        sys.exit(0)
client.set_user_attr("seen_params", client.params())
client.result(args.x + args.bonus)
"""


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def _space(text: str = CONDITIONAL_SPACE) -> SearchSpace:
    import tomllib

    return parse_space(tomllib.loads(text))


def _result(run_dir: Path, number: int) -> dict[str, Any]:
    return dict(json.loads((run_dir / "trials" / f"{number:05d}" / "result.json").read_text()))


def test_a_script_reporting_through_the_client_is_pruned_by_a_median_pruner(
    tmp_path: Path,
) -> None:
    script = _write(tmp_path, "train.py", CLIENT_SCRIPT)
    objective = CommandObjective(
        f"{PYTHON} {script} --x {{x}} --bonus={{bonus}}", _space(), prune_grace=0.5
    )
    study = optuna.create_study(
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    )
    for params in (
        {"kind": "plain", "x": 1.0},
        {"kind": "boosted", "x": 2.0, "bonus": 0.5},
        {"kind": "plain", "x": 3.0},  # above the median: pruned, exits by itself
        {"kind": "plain", "x": 4.0},  # pruned, hangs until terminated
        {"kind": "boosted", "x": 0.5, "bonus": 0.25},
    ):
        study.enqueue_trial(params)
    run_dir = tmp_path / "run"
    # One slot, so the pruner always sees the earlier trials finished.
    outcome = hyperfleet.optimize(
        study,
        objective,
        n_trials=5,
        cpu_slots=1,
        run_dir=run_dir,
        display="quiet",
        report=False,
    )

    assert outcome.status == "completed"
    trials = study.trials
    states = [t.state for t in trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ]
    assert [t.value for t in trials if t.state == TrialState.COMPLETE] == [1.0, 2.5, 0.75]
    assert trials[1].intermediate_values == {0: 2.0, 1: 2.0, 2: 2.0}
    assert trials[1].params == {"kind": "boosted", "x": 2.0, "bonus": 0.5}
    assert trials[1].user_attrs["seen_params"] == {"kind": "boosted", "x": 2.0, "bonus": 0.5}
    # The conditional option is given only to trials that have the parameter.
    stdout = [(run_dir / "trials" / f"{n:05d}" / "stdout.log").read_text() for n in range(5)]
    assert "argv ['--x', '1.0']" in stdout[0]
    assert "argv ['--x', '2.0', '--bonus=0.5']" in stdout[1]
    assert '{"value": 2.5}' in stdout[1]
    assert _result(run_dir, 3)["state"] == "PRUNED"


def test_a_script_printing_a_json_line_runs_on_its_slot_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "2")
    script = _write(
        tmp_path,
        "fit.py",
        """
        import json, os, sys
        print("gpus", os.environ["CUDA_VISIBLE_DEVICES"])
        x = float(sys.argv[1])
        print(json.dumps({"value": 100.0}))  # an earlier line that looks like a result
        print(json.dumps({"value": (x - 2) ** 2, "note": "loss"}))
        print("done")
        """,
    )
    space = _write(
        tmp_path,
        "space.toml",
        """
        [params.x]
        type = "float"
        low = 0.0
        high = 4.0
        """,
    )
    run_dir = tmp_path / "run"
    status = cli_main(
        [
            "run",
            "--cmd",
            f"{PYTHON} {script} {{x}}",
            "--space",
            str(space),
            "--n-trials",
            "3",
            "--cpu-slots",
            "0",
            "--run-dir",
            str(run_dir),
            "--quiet",
            "--no-report",
        ]
    )

    assert status == 0
    study = optuna.load_study(
        study_name="fit",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal"))
        ),
    )
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    for trial in complete:
        assert trial.value == pytest.approx((trial.params["x"] - 2) ** 2)
        # The command inherits its slot's GPU: slot gpuN#0 sees its UUID, GPU-fake-N.
        gpu = _result(run_dir, trial.number)["slot"].removeprefix("gpu").split("#")[0]
        stdout = (run_dir / "trials" / f"{trial.number:05d}" / "stdout.log").read_text()
        assert stdout.splitlines()[0] == f"gpus GPU-fake-{gpu}"


def test_a_non_zero_exit_fails_the_trial_with_the_end_of_stderr(tmp_path: Path) -> None:
    script = _write(
        tmp_path,
        "broken.py",
        """
        import sys
        print("loading data", file=sys.stderr)
        print("ValueError: the data set is empty", file=sys.stderr)
        sys.exit(3)
        """,
    )
    objective = CommandObjective(
        f"{PYTHON} {script} {{x}}",
        parse_space({"params": {"x": {"type": "int", "low": 0, "high": 5}}}),
    )
    study = optuna.create_study()
    run_dir = tmp_path / "run"
    outcome = hyperfleet.optimize(
        study, objective, n_trials=1, cpu_slots=1, run_dir=run_dir, display="quiet", report=False
    )

    assert outcome.status == "failed"  # every trial failed
    assert study.trials[0].state == TrialState.FAIL
    result = _result(run_dir, 0)
    assert "exited with status 3" in result["reason"]
    assert "ValueError: the data set is empty" in result["reason"]
    assert "the data set is empty" in result["stderr_tail"]


def _one_trial(objective: CommandObjective) -> Any:
    """Run the objective in this process on a plain Optuna trial."""
    study = optuna.create_study()
    return objective(study.ask())


def test_a_command_without_a_result_or_a_program_raises_a_clear_error(tmp_path: Path) -> None:
    space = parse_space({"params": {"x": {"type": "int", "low": 0, "high": 5}}})
    silent = CommandObjective([sys.executable, "-c", "print('no result here')", "{x}"], space)
    with pytest.raises(CommandError, match="gave no result"):
        _one_trial(silent)
    missing = CommandObjective("no-such-program-hyperfleet {x}", space)
    with pytest.raises(CommandError, match="cannot start 'no-such-program-hyperfleet'"):
        _one_trial(missing)


def test_several_values_come_from_a_values_line(tmp_path: Path) -> None:
    space = parse_space({"params": {"x": {"type": "int", "low": 2, "high": 2}}})
    code = "import sys, json; x = int(sys.argv[1]); print(json.dumps(dict(values=[x, x * x])))"
    objective = CommandObjective([sys.executable, "-c", code, "{x}"], space)
    assert _one_trial(objective) == [2, 4]


def test_the_template_is_checked_before_any_trial(tmp_path: Path) -> None:
    space = _space()
    with pytest.raises(ConfigError, match=r"uses \{lr\}, which is no parameter"):
        CommandObjective("python train.py --lr {lr}", space)
    with pytest.raises(ConfigError, match=re.escape("'--bonus={bonus}'")):
        CommandObjective("python train.py --x {x} --bonus {bonus}", space)
    with pytest.raises(ConfigError, match="cannot be filled in"):
        CommandObjective("python train.py --kind {kind:.2f}", space)
    with pytest.raises(ConfigError, match="malformed placeholder"):
        CommandObjective("python train.py --x {x", space)
    with pytest.raises(ConfigError, match="check its quotes"):
        CommandObjective("python 'train.py", space)


def test_rendering_fills_values_and_makes_existing_files_absolute(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    objective = CommandObjective(
        "python train.py out/ --x={x:.1f} --bonus={bonus} --all {params_json} --n {trial_number}",
        _space(),
        launch_dir=tmp_path,
    )
    assert objective.script_name == "train"
    words = objective.render({"kind": "plain", "x": 1.25}, trial_number=7)
    assert words == [
        sys.executable,  # "python" is the interpreter hyperfleet runs in
        str(tmp_path.resolve() / "train.py"),
        "out/",
        "--x=1.2",
        "--all",
        '{"kind": "plain", "x": 1.25}',
        "--n",
        "7",
    ]


def test_the_client_does_nothing_harmful_outside_hyperfleet(tmp_path: Path) -> None:
    script = _write(
        tmp_path,
        "by_hand.py",
        """
        from hyperfleet import client
        client.report(0.5, step=0)
        print("prune?", client.should_prune(), client.params(), client.trial_number())
        client.result(0.25)
        """,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERFLEET_")}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["prune? False {} None", '{"value": 0.25}']


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run"], "either as TARGET"),
        (["run", "train.py:objective", "--cmd", "python t.py"], "either as TARGET"),
        (["run", "--cmd", "python t.py"], "--cmd needs --space"),
        (["run", "train.py:objective", "--space", "s.toml"], "--space goes with --cmd"),
    ],
)
def test_the_command_line_wants_exactly_one_kind_of_objective(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli_main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_client_starts_without_importing_optuna() -> None:
    # A training script pays for the client on every trial; Optuna alone takes ~0.4 s to import.
    probe = "import sys; from hyperfleet import client; print('optuna' in sys.modules)"
    command = [sys.executable, "-c", probe]
    shown = subprocess.run(command, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "False"
