"""Optuna's callbacks and ``study.stop()`` under hyperfleet, as ``study.optimize`` runs them:
called once per finished trial in the controller, in the order trials end; a stop lets running
trials finish and the next run carries on; a callback that raises ends the run with its error.
Real runs on two CPU slots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

import hyperfleet
from hyperfleet.app.cli import main
from hyperfleet.errors import ConfigError


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    if trial.number % 3 == 2:
        raise optuna.TrialPruned()
    return x * x


def journal_study(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))
    )
    return optuna.create_study(
        study_name="cb", storage=storage, sampler=optuna.samplers.RandomSampler(seed=1),
        load_if_exists=True,
    )  # fmt: skip


def run(study: optuna.Study, tmp_path: Path, n_trials: int, **kwargs: object) -> hyperfleet.Outcome:
    return hyperfleet.optimize(
        study,
        objective,
        n_trials=n_trials,
        cpu_slots=2,
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
        **kwargs,  # type: ignore[arg-type]
    )


def test_every_finished_trial_reaches_each_callback_once_in_the_order_they_end(
    tmp_path: Path,
) -> None:
    seen: list[tuple[int, TrialState]] = []
    studies: list[optuna.Study] = []

    def remember(study: optuna.Study, trial: FrozenTrial) -> None:
        studies.append(study)
        seen.append((trial.number, trial.state))

    study = journal_study(tmp_path)
    outcome = run(study, tmp_path, 9, callbacks=[remember])

    assert outcome.status == "completed"
    stored = {(t.number, t.state) for t in study.get_trials()}
    assert sorted(seen) == sorted(stored) and len(seen) == 9
    assert {TrialState.COMPLETE, TrialState.PRUNED} <= {state for _, state in seen}
    ends = {t.number: t.datetime_complete for t in study.get_trials()}
    assert [ends[number] for number, _ in seen] == sorted(ends[number] for number, _ in seen)
    assert all(s.study_name == "cb" for s in studies)  # the controller's own study


def test_study_stop_from_a_callback_lets_running_trials_finish_and_the_next_run_carries_on(
    tmp_path: Path,
) -> None:
    def stop_after_four(study: optuna.Study, trial: FrozenTrial) -> None:
        if len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) >= 4:
            study.stop()

    study = journal_study(tmp_path)
    outcome = run(study, tmp_path, 30, callbacks=[stop_after_four])

    assert outcome.status == "stopped" and "study.stop()" in outcome.message
    trials = study.get_trials()
    assert 4 <= len(trials) <= 5  # the trial running on the other slot when it stopped finishes
    assert all(t.state != TrialState.RUNNING for t in trials)

    again = run(journal_study(tmp_path), tmp_path, 30)
    assert again.status == "completed"
    assert len(journal_study(tmp_path).get_trials()) == 30


def test_max_trials_callback_counts_every_run_on_the_shared_storage(tmp_path: Path) -> None:
    study = journal_study(tmp_path)
    run(study, tmp_path, 3)
    limit = MaxTrialsCallback(8, states=(TrialState.COMPLETE, TrialState.PRUNED))
    outcome = run(journal_study(tmp_path), tmp_path, 50, callbacks=[limit])

    assert outcome.status == "stopped"
    done = journal_study(tmp_path).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 8  # exactly: no trial starts that the running ones would take past it


def test_optunas_max_trials_example_on_three_slots_leaves_exactly_its_trials(
    tmp_path: Path,
) -> None:
    # Optuna's own example, with no n_trials: the callback is the only limit. Pruned trials do
    # not count, so more than ten start; exactly ten complete, on three slots.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    limit = MaxTrialsCallback(10, states=(TrialState.COMPLETE,))
    outcome = hyperfleet.optimize(
        study, objective, callbacks=[limit], cpu_slots=3, run_dir=tmp_path / "run",
        display="quiet", report=False,
    )  # fmt: skip
    assert outcome.status == "stopped"
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 10
    assert len(study.get_trials(states=(TrialState.PRUNED,))) >= 4
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_trial_study_stop_in_the_objective_stops_the_study_as_in_optuna(tmp_path: Path) -> None:
    def stops_at_four(trial: optuna.Trial) -> float:
        if trial.number == 4:
            trial.study.stop()
        return trial.suggest_float("x", 0.0, 10.0) ** 2

    study = optuna.create_study()
    outcome = hyperfleet.optimize(
        study, stops_at_four, n_trials=10, cpu_slots=1, run_dir=tmp_path / "run",
        display="quiet", report=False,
    )  # fmt: skip
    assert outcome.status == "stopped"
    assert len(study.trials) == 5  # Optuna's own example: the same with study.optimize


class Broken(Exception):
    pass


def test_a_callback_that_raises_ends_the_run_with_its_error_and_nothing_running(
    tmp_path: Path,
) -> None:
    def raises_at_three(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.number == 3:
            raise Broken("the tracker is down")

    study = journal_study(tmp_path)
    with pytest.raises(Broken, match="the tracker is down"):
        run(study, tmp_path, 40, callbacks=[raises_at_three])
    trials = study.get_trials()
    assert 4 <= len(trials) < 40
    assert all(t.state != TrialState.RUNNING for t in trials)
    log = (tmp_path / "run" / "run.log").read_text()
    assert (
        "the callback test_a_callback_that_raises" in log and "Broken: the tracker is down" in log
    )


@pytest.mark.parametrize("bad", [print, "print", 3, [3]])
def test_callbacks_that_are_not_a_list_of_callables_are_refused(
    bad: object, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="callback"):
        run(optuna.create_study(), tmp_path, 2, callbacks=bad)
    assert not (tmp_path / "run").exists()


CLI_FILES = {
    "search.py": """
def objective(trial):
    return trial.suggest_float("x", 0.0, 1.0) ** 2
""",
    "stops.py": """
from optuna.trial import TrialState


def after_three(study, trial):
    if len(study.get_trials(states=(TrialState.COMPLETE,))) >= 3:
        study.stop()
""",
}


def test_the_cli_takes_callbacks_by_module_and_by_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in CLI_FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    common = ["run", "search.py:objective", "--n-trials", "20", "--cpu-slots", "1", "--quiet"]

    assert main([*common, "--run-dir", "by-file", "--callback", "stops.py:after_three"]) == 130
    assert main([*common, "--run-dir", "by-module", "--callback", "stops:after_three"]) == 130
    for folder in ("by-file", "by-module"):
        study = optuna.load_study(
            study_name=None,
            storage=optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(
                    str(tmp_path / folder / "optuna.journal")
                )
            ),
        )
        assert len(study.trials) == 3


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("stops:nothing_here", "has no callable 'nothing_here'"),
        ("no_such_module:cb", "could not be imported: ModuleNotFoundError"),
        ("missing.py:cb", "could not be imported"),
        ("stops", "give MODULE:ATTR or FILE.py:ATTR"),
    ],
)
def test_a_callback_flag_that_does_not_import_is_refused_before_anything_is_written(
    given: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    for name, text in CLI_FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    args = ["run", "search.py:objective", "--n-trials", "2", "--run-dir", "out", "--callback"]
    assert main([*args, given]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


CAMPAIGN = """
[campaign]
name = "cbs"

[pool]
gpus = []

[defaults]
objective = "search.py:objective"
n_trials = 20

[[study]]
name = "stopped"
callbacks = ["stops.py:after_three"]

[[study]]
name = "whole"
"""


def test_a_campaign_study_s_callbacks_stop_that_study_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in {**CLI_FILES, "campaign.toml": CAMPAIGN}.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "campaign.toml", "--quiet", "--no-report"]) == 130
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "runs/cbs/optuna.journal"))
    )
    complete = (TrialState.COMPLETE,)
    stopped = optuna.load_study(study_name="stopped", storage=storage)
    whole = optuna.load_study(study_name="whole", storage=storage)
    assert 3 <= len(stopped.get_trials(states=complete)) <= 4  # one running may finish
    assert len(whole.get_trials(states=complete)) == 20


def test_a_campaign_callback_that_does_not_import_is_refused_at_its_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = CAMPAIGN.replace("stops.py:after_three", "stops.py:no_such_thing")
    for name, text in {**CLI_FILES, "campaign.toml": broken}.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "campaign.toml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "study 'stopped': callback" in err and "no callable 'no_such_thing'" in err
    assert not (tmp_path / "runs" / "cbs" / "optuna.journal").exists()


def model_a(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


def make_model(offset: float) -> Callable[[optuna.Trial], float]:
    def model(trial: optuna.Trial) -> float:
        return offset + trial.suggest_float("y", 0.0, 1.0)

    return model


def test_a_campaign_given_as_python_values_runs_its_functions_side_by_side(
    tmp_path: Path,
) -> None:
    ends: list[str] = []

    def count(study: optuna.Study, trial: FrozenTrial) -> None:
        ends.append(study.study_name)

    outcome = hyperfleet.run_campaign(
        {
            "campaign": {"name": "notebook"},
            "pool": {"gpus": []},
            "defaults": {"n_trials": 4},
            "study": [
                {"name": "a", "objective": model_a, "callbacks": [count]},
                {"name": "b", "objective": make_model, "args": {"offset": 10.0}},
            ],
        },
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
    )
    assert outcome.status == "completed", outcome.message
    by_name = {s.study_name: s for s in outcome.studies}
    assert [len(by_name[n].trials) for n in ("a", "b")] == [4, 4]
    assert all(t.value is not None and t.value >= 10.0 for t in by_name["b"].trials)
    assert ends == ["a"] * 4


def test_a_campaign_given_as_values_without_a_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run_campaign\\(\\): \\[campaign\\]"):
        hyperfleet.run_campaign(
            {"study": [{"name": "a", "objective": model_a, "n_trials": 2}]},
            run_dir=tmp_path / "run",
            display="quiet",
        )
