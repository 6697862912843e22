"""The search itself: pruning, multi-objective studies, real concurrency, constant liar, the
n_trials budget across runs, and each trial's own folder and output files."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

import hyperfleet
from hyperfleet.app.cli import build_parser, main
from hyperfleet.resources.inventory import Inventory
from hyperfleet.sampling.auto_sampler import AutoSampler
from hyperfleet.sampling.samplers import make_sampler

OBJECTIVES = Path(__file__).parent / "objectives"
PACED = OBJECTIVES / "paced.py"


@pytest.fixture
def search(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    return importlib.import_module("search_objectives")


@pytest.fixture
def paced(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    return importlib.import_module("paced")


def cpu_pool(slots: int) -> dict[str, Any]:
    """``slots`` CPU-only workers on this machine's cores, whatever GPUs it has."""
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return {"inventory": Inventory(gpus=(), cores=cores), "cpu_slots": slots}


def test_median_pruner_prunes_bad_trials_at_their_first_report(
    search: ModuleType, tmp_path: Path
) -> None:
    study = optuna.create_study(
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    )
    hyperfleet.optimize(
        study, search.learning_curve, n_trials=8, run_dir=tmp_path, display="quiet", **cpu_pool(2)
    )

    trials = study.get_trials()
    assert len(trials) == 8
    for trial in trials:
        if trial.number % 2 == 0:
            assert trial.state == TrialState.COMPLETE
            assert sorted(trial.intermediate_values) == list(range(search.EPOCHS))
        elif trial.number >= 3:  # trial 1 may run before two trials are complete
            assert trial.state == TrialState.PRUNED
            assert list(trial.intermediate_values) == [0]
            assert trial.user_attrs["epochs_run"] == 1


def test_multi_objective_study(search: ModuleType, tmp_path: Path) -> None:
    study = optuna.create_study(directions=["minimize", "maximize"])
    outcome = hyperfleet.optimize(
        study, search.two_objectives, n_trials=4, run_dir=tmp_path, display="quiet", **cpu_pool(2)
    )

    assert outcome.status == "completed"
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    for trial in trials:
        x = trial.params["x"]
        assert trial.values == pytest.approx([x, x * x])
        assert trial.user_attrs == {"directions": ["MINIMIZE", "MAXIMIZE"], "report_refused": True}
    assert study.best_trials


def test_two_slots_run_two_trials_at_the_same_time(
    paced: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each trial waits until the next one has started: only concurrent slots can finish them.
    monkeypatch.setenv(paced.LAST_TRIAL_ENV, "3")
    study = optuna.create_study()
    hyperfleet.optimize(
        study, paced.objective, n_trials=4, run_dir=tmp_path, display="quiet", **cpu_pool(2)
    )

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    for current, following in itertools.pairwise(trials):
        assert current.datetime_complete is not None and following.datetime_start is not None
        assert following.datetime_start < current.datetime_complete
        assert following.user_attrs["pid"] != current.user_attrs["pid"]


def test_default_sampler_is_auto_and_tpe_has_constant_liar() -> None:
    args = build_parser().parse_args(["run", "train.py:objective"])
    assert isinstance(make_sampler(args.sampler, seed=0), AutoSampler)
    sampler = make_sampler("tpe", seed=0)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._constant_liar is True


def liar_gaps(run_dir: Path, study_name: str) -> list[float]:
    """How far apart each trial's x is from its predecessor's, which was running when it was
    suggested; only trials past TPE's ten random startup trials count."""
    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(trials)
    xs = [t.params["x"] for t in trials]
    return [abs(a - b) for a, b in itertools.pairwise(xs[10:])]


def test_parallel_tpe_trials_do_not_pile_onto_the_same_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through ``hyperfleet run`` with TPE, two slots, a 1-D space and every
    trial suggested while its predecessor runs. The chain fixes the order of every sampler
    call, so with a seed the run is reproducible: without constant liar TPE suggests nearly the
    same x twice in a row (median gap 0.05 with seed 0); with it, the running trial's point
    counts as bad and the next suggestion goes elsewhere (0.19)."""
    n_trials = 30
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "0")
    monkeypatch.setenv("PACED_LAST_TRIAL", str(n_trials - 1))
    run_dir = tmp_path / "run"
    code = main(
        [
            *("run", f"{PACED}:objective", "--n-trials", str(n_trials), "--seed", "0"),
            *("--sampler", "tpe"),
            *("--cpu-slots", "2", "--run-dir", str(run_dir), "--study-name", "liar", "--quiet"),
        ]
    )

    assert code == 0, capsys.readouterr().err
    assert statistics.median(liar_gaps(run_dir, "liar")) > 0.12


def test_n_trials_counts_the_studys_finished_trials_across_runs(
    search: ModuleType, tmp_path: Path
) -> None:
    journal = str(tmp_path / "study.journal")

    def run(n_trials: int) -> int:
        study = optuna.create_study(
            study_name="resume",
            storage=JournalStorage(JournalFileBackend(journal)),
            load_if_exists=True,
        )
        hyperfleet.optimize(
            study,
            search.quick,
            n_trials=n_trials,
            run_dir=tmp_path / "run",
            display="quiet",
            **cpu_pool(2),
        )
        return len(study.get_trials(states=(TrialState.COMPLETE,)))

    assert run(3) == 3
    assert run(3) == 3  # the same command again: the budget is already spent
    assert run(5) == 5  # a larger budget tops up


def test_timeout_bounds_the_runs_wall_time(search: ModuleType, tmp_path: Path) -> None:
    study = optuna.create_study()
    started = time.monotonic()
    outcome = hyperfleet.optimize(
        study, search.quick, timeout="2s", run_dir=tmp_path, display="quiet", **cpu_pool(1)
    )

    assert outcome.status == "completed"
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) >= 1
    # Workers take a moment to start and stop; the search itself stops starting trials at 2s.
    assert time.monotonic() - started < 30


def test_each_trial_runs_in_its_own_folder_with_its_output_there(
    search: ModuleType, tmp_path: Path
) -> None:
    study = optuna.create_study()
    run_dir = tmp_path / "run"
    hyperfleet.optimize(
        study, search.noisy, n_trials=2, run_dir=run_dir, display="quiet", **cpu_pool(1)
    )

    for trial in study.get_trials():
        n = trial.number
        folder = run_dir / "trials" / f"{n:05d}"
        assert trial.user_attrs["cwd"] == str(folder)
        stdout = (folder / "stdout.log").read_text()
        assert f"stdout of trial {n}\n" in stdout
        assert f"fd 1 of trial {n}\n" in stdout
        assert f"child of trial {n}\n" in stdout
        assert "of trial" not in stdout.replace(f"of trial {n}", "")  # nothing from the other
        assert (folder / "stderr.log").read_text() == f"stderr of trial {n}\n"
        assert (folder / "checkpoint.txt").read_text() == str(trial.params["x"])
        assert json.loads((folder / "params.json").read_text()) == trial.params
        assert json.loads((folder / "result.json").read_text())["state"] == "COMPLETE"


def test_trials_enqueued_before_the_run_go_first(search: ModuleType, tmp_path: Path) -> None:
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.25})
    study.enqueue_trial({"x": 0.75}, user_attrs={"source": "enqueued"})
    hyperfleet.optimize(
        study, search.quick, n_trials=3, run_dir=tmp_path, display="quiet", **cpu_pool(1)
    )

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.params["x"] for t in trials[:2]] == [0.25, 0.75]
    assert trials[1].user_attrs == {"source": "enqueued"}
    assert trials[1].value == pytest.approx(0.75**2)
