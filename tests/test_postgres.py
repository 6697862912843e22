"""Searches on a real PostgreSQL server, the database teams share studies in: ``hyperfleet run
--storage postgresql+psycopg://...`` and ``hyperfleet.optimize`` on a study in it run their
trials, a run killed with SIGKILL resumes exactly, two runs on one study keep to the budget, and
each trial is created with where it runs in one transaction.

The server is started once for the session from the machine's packages
(``tests/support/postgres.py``); the tests skip, saying why, where none can be started.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

import hyperfleet
from hyperfleet.errors import StorageError
from hyperfleet.store.storage import open_storage
from support.background import BackgroundRun, started
from support.postgres import PostgresServer, postgres_or_skip
from support.procs import assert_no_leftovers, cpu_only_env, objective, run_cli, wait_until

STUDY = "s"
PLACEMENT = ("hyperfleet:run", "hyperfleet:slot", "hyperfleet:worker_pid")
FAIL_KIND = "hyperfleet:fail_kind"
RETRY_OF = "hyperfleet.retry_of"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_or_skip() as server:
        yield server


@pytest.fixture
def database(postgres: PostgresServer) -> str:
    """A new database of the session's server, for one test."""
    return postgres.new_database()


def search(url: str, run_dir: Path, n_trials: int, name: str = "quick", *flags: str) -> list[str]:
    return [
        "run", objective(name), "--storage", url, "--study-name", STUDY, "--run-dir",
        str(run_dir), "--n-trials", str(n_trials), "--cpu-slots", "2", "--plain", "--no-report",
        *flags,
    ]  # fmt: skip


def trials_in(url: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=url).get_trials()


def objective_env(folder: Path) -> dict[str, str]:
    folder.mkdir(exist_ok=True)
    return {**cpu_only_env(), "TEST_FOLDER": str(folder)}


def test_a_search_on_postgresql_runs_its_trials_each_marked_where_it_ran(
    database: str, tmp_path: Path
) -> None:
    done = run_cli(search(database, tmp_path / "run", 8), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = trials_in(database)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert sorted(t.number for t in trials) == list(range(8))
    for trial in trials:
        assert all(key in trial.system_attrs for key in PLACEMENT)
    assert {t.system_attrs["hyperfleet:slot"] for t in trials} <= {"cpu#0", "cpu#1"}
    assert_no_leftovers(tmp_path / "run")


# random: the next trials are prepared ahead, as enqueued trials (controller/prepared.py).
@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_run_killed_mid_search_resumes_exactly(
    database: str, tmp_path: Path, sampler: str
) -> None:
    run_dir, folder = tmp_path / "run", tmp_path / "objective"
    args = search(database, run_dir, 5, "waits_for_release", "--sampler", sampler)
    run = BackgroundRun(args, tmp_path, objective_env(folder))
    try:
        wait_until(lambda: started(folder) == 2, 60, "two trials to start")
        run.kill()
    finally:
        run.stop()
    assert_no_leftovers(run_dir)
    assert [t.state for t in trials_in(database)][:2] == [TrialState.RUNNING] * 2

    (folder / "release").touch()
    again = run_cli(args, tmp_path, env=objective_env(folder))
    assert again.returncode == 0, again.stdout + again.stderr
    trials = trials_in(database)
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert states.count(TrialState.COMPLETE) == 5  # the budget, exactly
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.number for t in interrupted} == {0, 1}
    assert all(t.system_attrs[FAIL_KIND] == "interrupted" for t in interrupted)
    repeats = [t for t in trials if RETRY_OF in t.user_attrs]
    assert sorted(t.user_attrs[RETRY_OF] for t in repeats) == [0, 1]  # each once
    for repeat in repeats:
        assert repeat.state == TrialState.COMPLETE
        assert repeat.params == trials[repeat.user_attrs[RETRY_OF]].params
    assert len({t.number for t in trials}) == len(trials)
    assert_no_leftovers(run_dir)


def run_together(url: str, tmp_path: Path, n_trials: int) -> None:
    """Two runs of one study started at the same moment, each with its own run folder, to the
    end; both succeed."""
    runs = [
        BackgroundRun(
            search(url, tmp_path / f"run-{name}", n_trials, "short_and_logged"),
            tmp_path,
            objective_env(tmp_path / name),
            name=name,
        )
        for name in ("a", "b")
    ]
    try:
        for run in runs:
            assert run.wait(120) == 0, run.stdout + run.stderr
    finally:
        for run in runs:
            run.stop()


def test_two_runs_started_together_on_a_new_database_both_run(
    database: str, tmp_path: Path
) -> None:
    """The first to open a new database creates Optuna's tables; both may try at once."""
    run_together(database, tmp_path, 4)
    states = [t.state for t in trials_in(database)]
    assert 4 <= states.count(TrialState.COMPLETE) <= 6


def test_two_runs_on_one_study_keep_to_the_budget_together(database: str, tmp_path: Path) -> None:
    n_trials = 12
    optuna.create_study(study_name=STUDY, storage=database)  # the study the team shares
    run_together(database, tmp_path, n_trials)
    states = [t.state for t in trials_in(database)]
    assert TrialState.RUNNING not in states
    # As documented: together at least the budget, and past it by at most the trials the other
    # run still had running when it was reached (one per slot: 2).
    assert n_trials <= states.count(TrialState.COMPLETE) <= n_trials + 2
    assert all(started(tmp_path / name) > 0 for name in ("a", "b"))  # both took part


def _square(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def test_optimize_on_a_database_study_writes_each_placement_with_its_trial(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marks of where a trial runs go in the transaction that creates it, not in three
    more round trips and commits after it; what is stored is the same."""
    written_after: list[str] = []
    set_attr = RDBStorage.set_trial_system_attr

    def counted(self: RDBStorage, trial_id: int, key: str, value: Any) -> None:
        written_after.append(key)
        set_attr(self, trial_id, key, value)

    monkeypatch.setattr(RDBStorage, "set_trial_system_attr", counted)
    study = optuna.create_study(study_name=STUDY, storage=database)
    outcome = hyperfleet.optimize(
        study, _square, n_trials=6, cpu_slots=2, gpus=[], run_dir=tmp_path / "run",
        display="quiet", report=False,
    )  # fmt: skip
    assert outcome.status == "completed"
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert all(key in t.system_attrs for t in trials for key in PLACEMENT)
    assert not set(written_after) & set(PLACEMENT)


def test_a_missing_database_driver_names_the_package_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(StorageError) as raised:
        open_storage("postgresql://user@127.0.0.1:5432/db", tmp_path / "optuna.journal")
    message = str(raised.value)
    assert 'pip install "psycopg[binary]"' in message
    assert "\n" not in message


def test_the_controller_writes_the_trials_it_runs_without_reading_them_back(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial the controller runs is written with the statement alone, never read back, and
    costs a fraction of what a plain Optuna process sends (44 statements per TPE trial)."""
    through_optuna: list[str] = []
    for name in ("set_trial_param", "set_trial_state_values", "get_trial", "_get_trials"):
        method = getattr(RDBStorage, name)

        def counted(
            self: RDBStorage, *args: Any, _name: str = name, _m: Any = method, **kw: Any
        ) -> Any:
            through_optuna.append(_name)
            return _m(self, *args, **kw)

        monkeypatch.setattr(RDBStorage, name, counted)
    statements: list[str] = []

    def sent(*args: Any) -> None:
        statements.append(args[2])

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", sent)
    study = optuna.create_study(study_name=STUDY, storage=database)
    try:
        outcome = hyperfleet.optimize(
            study, _square, n_trials=20, cpu_slots=2, gpus=[], run_dir=tmp_path / "run",
            display="quiet", report=False,
        )  # fmt: skip
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", sent)
    controller_calls = list(through_optuna)
    assert outcome.status == "completed"
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 20
    # No trial read back, and no state written through Optuna's storage (the one read of all
    # trials is the summary's, at the end).
    assert controller_calls.count("_get_trials") <= 1
    assert not {"get_trial", "set_trial_param", "set_trial_state_values"} & set(controller_calls)
    assert len(statements) / 20 < 20
