"""Bad input stops before anything is written, with exit status 2 and a message that says what
was wrong and how to fix it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest

import hyperfleet
from hyperfleet.config import parse_duration
from hyperfleet.errors import ConfigError, ObjectiveError, ResourceError, RunDirError
from hyperfleet.resources.inventory import Gpu, Inventory
from support.procs import cpu_only_env, run_cli

GOOD = """\
def objective(trial):
    return trial.suggest_float("x", 0, 1)

def helper(trial):
    return 0.0

value = 5
"""

IMPORT_ERROR = """\
import math

def setup():
    import not_a_module_anywhere_xyz

setup()

def objective(trial):
    return 0.0
"""

SYNTAX_ERROR = "def objective(trial)\n    return 0.0\n"


@dataclass(frozen=True)
class Bad:
    name: str
    args: tuple[str, ...]
    says: tuple[str, ...]  # pieces the error message must contain
    fake_gpus: int = 0
    env: tuple[tuple[str, str], ...] = ()  # "{tmp}" stands for the test's folder


# On PYTHONPATH, a folder whose packages fail to import as missing ones do: torch and grpc
# (Ray's client extra) are installed with the dev extra, and must look absent to these runs.
WITHOUT_TORCH_OR_GRPC = (("PYTHONPATH", "{tmp}/hidden"),)
TWO_OBJECTIVES = ("--direction", "minimize", "--direction", "maximize")


CASES = [
    Bad("missing-file", ("missing.py:objective",), ("missing.py does not exist",)),
    Bad("missing-function", ("good.py:nope",), ("defines no 'nope'", "helper, objective")),
    Bad("syntax-error", ("syntax.py:objective",), ("syntax.py:1: syntax error",)),
    Bad(
        "import-error",
        ("imports.py:objective",),
        ("could not be loaded", "imports.py", "setup()", "ModuleNotFoundError"),
    ),
    Bad("not-callable", ("good.py:value",), ("is a int, not a callable",)),
    Bad("unknown-sampler", ("good.py:objective", "--sampler", "magic"), ("unknown sampler",)),
    Bad("unknown-pruner", ("good.py:objective", "--pruner", "magic"), ("unknown pruner",)),
    Bad("url-no-slashes", ("good.py:objective", "--storage", "sqlite:/x.db"), ("malformed",)),
    Bad(
        "url-bad-port",
        ("good.py:objective", "--storage", "postgresql://u@host:port/db"),
        ("malformed",),
    ),
    Bad("url-scheme", ("good.py:objective", "--storage", "redis2://h/0"), ("unknown scheme",)),
    Bad(
        "database-folder-missing",
        ("good.py:objective", "--storage", "sqlite:///no/such/folder/x.db"),
        ("cannot create the SQLite database", "folder", "does not exist", "mkdir -p"),
    ),
    Bad("gpu-index", ("good.py:objective", "--gpus", "7"), ("GPU '7' does not exist",), 4),
    Bad("gpu-uuid", ("good.py:objective", "--gpus", "GPU-nope"), ("does not exist",), 4),
    Bad(
        "trials-per-gpu",
        ("good.py:objective", "--trials-per-gpu", "0"),
        ("trials_per_gpu=0", "--trials-per-gpu 1"),
        4,
    ),
    Bad(
        "gpu-memory",
        ("good.py:objective", "--gpu-memory", "lots"),
        ("cannot read --gpu-memory 'lots'", "10GiB"),
    ),
    Bad("cpu-slots-negative", ("good.py:objective", "--cpu-slots", "-1"), ("cpu_slots=-1",)),
    Bad("cpu-slots-none-left", ("good.py:objective", "--cpu-slots", "0"), ("cpu_slots=0",)),
    Bad(
        "gpus-per-trial",
        ("good.py:objective", "--gpus-per-trial", "5"),
        ("gpus_per_trial=5", "only 4 GPU(s)"),
        4,
    ),
    Bad("n-trials-zero", ("good.py:objective", "--n-trials", "0"), ("n_trials=0",)),
    Bad("n-trials-negative", ("good.py:objective", "--n-trials", "-3"), ("n_trials=-3",)),
    Bad("timeout-zero", ("good.py:objective", "--timeout", "0"), ("must be positive",)),
    Bad("timeout-negative", ("good.py:objective", "--timeout=-5m"), ("cannot read timeout",)),
    Bad("timeout-garbage", ("good.py:objective", "--timeout", "10x"), ("cannot read timeout",)),
    Bad(
        "trial-timeout-garbage",
        ("good.py:objective", "--trial-timeout", "soon"),
        ("cannot read trial timeout", "1h30m"),
    ),
    Bad("retry-garbage", ("good.py:objective", "--retry", "crash"), ("REASON=MAX",)),
    Bad("stop-grace-garbage", ("good.py:objective", "--stop-grace", "x"), ("stop grace",)),
    Bad(
        "gp-without-torch",
        ("good.py:objective", "--sampler", "gp"),
        ("sampler 'gp' needs torch", "No module named 'torch'", "pip install torch"),
        env=WITHOUT_TORCH_OR_GRPC,
    ),
    Bad(
        "cmaes-two-objectives",
        ("good.py:objective", "--sampler", "cmaes", *TWO_OBJECTIVES),
        ("sampler 'cmaes' optimises one objective", "2 directions", "nsga2"),
    ),
    Bad("seed-negative", ("good.py:objective", "--seed=-1"), ("seed -1 is out of range",)),
    Bad("seed-too-large", ("good.py:objective", "--seed", str(2**70)), ("out of range", "2**32")),
    Bad(
        "ray-client-without-extra",
        ("good.py:objective", "--ray", "ray://127.0.0.1:10001"),
        ("Ray Client", "No module named 'grpc'", "pip install 'ray[client]'"),
        env=WITHOUT_TORCH_OR_GRPC,
    ),
    Bad(  # port 1 (tcpmux) has nothing listening: the connection is refused at once
        "ray-nothing-answers",
        ("good.py:objective", "--ray", "127.0.0.1:1"),
        ("nothing answers at 127.0.0.1:1", "ray start --head"),
    ),
    Bad(
        "fake-gpu-memory",
        ("good.py:objective",),
        ("HYPERFLEET_FAKE_GPU_MIB='16G'", "in MiB"),
        fake_gpus=2,
        env=(("HYPERFLEET_FAKE_GPU_MIB", "16G"),),
    ),
    Bad(
        "fake-gpu-count",
        ("good.py:objective",),
        ("HYPERFLEET_FAKE_GPUS=1000000", "could give a slot each"),
        fake_gpus=1_000_000,
    ),
    Bad(
        "run-dir-under-a-file",
        ("good.py:objective", "--run-dir", "a-file/run"),
        ("a-file is not a folder", "--run-dir"),
    ),
]


def _write_inputs(folder: Path) -> None:
    (folder / "good.py").write_text(GOOD)
    (folder / "imports.py").write_text(IMPORT_ERROR)
    (folder / "syntax.py").write_text(SYNTAX_ERROR)
    (folder / "a-file").write_text("not a folder\n")
    for module in ("torch", "grpc"):
        package = folder / "hidden" / module
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n"
        )


def _listing(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in folder.rglob("*")
        if "__pycache__" not in p.parts
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_stops_before_anything_is_written(tmp_path: Path, case: Bad) -> None:
    _write_inputs(tmp_path)
    before = _listing(tmp_path)
    env = cpu_only_env()
    if case.fake_gpus:
        env["HYPERFLEET_FAKE_GPUS"] = str(case.fake_gpus)
    env.update((name, value.replace("{tmp}", str(tmp_path))) for name, value in case.env)
    args = ["run", *case.args, "--plain"]
    if "--run-dir" not in case.args:
        args += ["--run-dir", "run"]
    result = run_cli(args, tmp_path, env=env)

    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr
    for piece in case.says:
        assert piece in message, message
    assert message.startswith("hyperfleet: error: ")
    if case.name == "import-error":
        # The user's own frames, none of hyperfleet's.
        assert "Traceback" in message and "/hyperfleet/" not in message
    else:
        assert "Traceback" not in message
        assert len(message.strip().splitlines()) <= 3, message
    assert _listing(tmp_path) == before


def _study_in(tmp_path: Path, *directions: str) -> Path:
    """A run directory holding a finished one-trial study named "s"."""
    _write_inputs(tmp_path)
    flags = [x for d in directions for x in ("--direction", d)]
    args = ["run", "good.py:objective", "--run-dir", "run", "--study-name", "s", "--n-trials"]
    result = run_cli([*args, "1", "--cpu-slots", "1", "--quiet", *flags], tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "run"


@pytest.mark.parametrize(
    "asked", [("maximize",), ("minimize", "minimize")], ids=["direction", "objectives"]
)
def test_directions_must_match_the_existing_study(tmp_path: Path, asked: tuple[str, ...]) -> None:
    run_dir = _study_in(tmp_path, "minimize")
    before = _listing(run_dir)
    flags = [x for d in asked for x in ("--direction", d)]
    args = ["run", "good.py:objective", "--run-dir", "run", "--study-name", "s", "--n-trials"]
    result = run_cli([*args, "2", "--cpu-slots", "1", *flags], tmp_path)
    assert result.returncode == 2
    assert "already exists with direction(s) ['minimize']" in result.stderr
    assert _listing(run_dir) == before


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    _write_inputs(tmp_path)
    result = run_cli(["run", "good.py:objective", "--sampler", "magic", "--debug"], tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError: unknown sampler" in result.stderr


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("45", 45), (" 1.5h ", 5400)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def _objective(trial: optuna.Trial) -> float:
    return 0.0


FAKE = Inventory(
    gpus=tuple(Gpu(index=i, uuid=f"GPU-fake-{i}", name="fake", kind="fake") for i in range(2)),
    cores=(0,),
)

API_CASES = [
    ("n_trials", {"n_trials": 0}, ConfigError),
    ("timeout", {"timeout": "soon"}, ConfigError),
    ("trial_timeout", {"trial_timeout": -1}, ConfigError),
    ("retry", {"retry": "bogus=1"}, ConfigError),
    ("trials_per_gpu", {"trials_per_gpu": 0, "inventory": FAKE}, ConfigError),
    ("trials_per_gpu-word", {"trials_per_gpu": "lots", "inventory": FAKE}, ConfigError),
    ("gpu_memory", {"gpu_memory": "-2GiB", "inventory": FAKE}, ConfigError),
    (
        "gpu_memory-fixed",
        {"gpu_memory": "1GiB", "trials_per_gpu": 2, "inventory": FAKE},
        ConfigError,
    ),
    ("missing-gpu-index", {"gpus": [5], "inventory": FAKE}, ResourceError),
    ("gpus_per_trial", {"gpus_per_trial": 3, "inventory": FAKE}, ResourceError),
    ("objective", {"objective": 5}, ObjectiveError),
    ("run_dir", {"run_dir": "a-file/run"}, RunDirError),
]


@pytest.mark.parametrize(("name", "kwargs", "error"), API_CASES, ids=[c[0] for c in API_CASES])
def test_the_api_raises_the_same_errors(
    tmp_path: Path, name: str, kwargs: dict[str, object], error: type[Exception]
) -> None:
    _write_inputs(tmp_path)
    before = _listing(tmp_path)
    study = optuna.create_study()
    call: dict[str, object] = {"objective": _objective, "run_dir": tmp_path / "run", **kwargs}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(error):
            hyperfleet.optimize(study, display="quiet", **call)  # type: ignore[arg-type]
    finally:
        os.chdir(cwd)
    assert _listing(tmp_path) == before


def test_the_api_refuses_early_what_would_fail_once_trials_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp = optuna.create_study(sampler=optuna.samplers.GPSampler())
    cmaes = optuna.create_study(
        directions=["minimize", "maximize"], sampler=optuna.samplers.CmaEsSampler()
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as without torch
    cases: list[tuple[optuna.Study, dict[str, Any], type[Exception], str]] = [
        (gp, {}, ConfigError, "the study's GPSampler needs torch"),
        (cmaes, {}, ConfigError, "CmaEsSampler optimises one objective"),
        (optuna.create_study(), {"ray": "127.0.0.1:1"}, ConfigError, "nothing answers"),
    ]
    for study, kwargs, error, says in cases:
        with pytest.raises(error, match=says):
            hyperfleet.optimize(study, _objective, 1, run_dir="run", display="quiet", **kwargs)
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "1000000")
    with pytest.raises(ResourceError, match="could give a slot each"):
        hyperfleet.optimize(optuna.create_study(), _objective, 1, run_dir="run")
    assert list(tmp_path.iterdir()) == []
