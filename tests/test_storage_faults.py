"""A journal cut short by a kill or a full disk is repaired; one that is not a journal, or is
damaged anywhere else, is refused untouched with one line that names the file and the line.
A storage file in a folder that does not exist yet is created with the run directory, or
refused with a message that says which folder is missing."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from support.procs import run_cli

OBJECTIVE = """\
def objective(trial):
    return trial.suggest_float("x", 0, 1)
"""
STUDY = "objective-objective"  # the default name for objective.py:objective
# The start of a record Optuna was writing when the process died: no end, no newline.
TORN = b'{"op_code":4,"worker_id":"dead-writer","study_id":0,"datetime_start":"2024-01-0'


def _run(tmp_path: Path, *flags: str, n_trials: int = 2) -> tuple[int, str]:
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    args = ["run", "objective.py:objective", "--cpu-slots", "1", "--n-trials", str(n_trials)]
    result = run_cli([*args, "--no-report", "--quiet", *flags], tmp_path)
    return result.returncode, result.stderr


def _journal_with_trials(path: Path, n_trials: int = 2) -> bytes:
    """A journal written by plain Optuna: one study, ``n_trials`` complete trials."""
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name=STUDY, storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n_trials)
    return path.read_bytes()


def _complete_trials(path: Path) -> int:
    """What plain Optuna reads from the journal at ``path``."""
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.load_study(study_name=STUDY, storage=storage)
    return len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE]))


def _assert_refused(code: int, stderr: str, *says: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    (line,) = lines
    assert line.startswith("hyperfleet: error: "), line
    for piece in says:
        assert piece in line, line
    return line


def test_a_torn_last_line_of_a_storage_journal_is_cut_off(tmp_path: Path) -> None:
    journal = tmp_path / "shared.journal"
    valid = _journal_with_trials(journal)
    journal.write_bytes(valid + TORN)

    code, stderr = _run(tmp_path, "--storage", "shared.journal", "--run-dir", "run", n_trials=4)

    assert code == 0, stderr
    data = journal.read_bytes()
    assert data.startswith(valid) and data.endswith(b"\n")
    assert TORN not in data
    assert _complete_trials(journal) == 4  # plain Optuna reads it: the 2 before, 2 more


def test_a_default_journal_of_random_bytes_is_refused_untouched(tmp_path: Path) -> None:
    journal = tmp_path / "run" / "optuna.journal"
    journal.parent.mkdir()
    garbage = random.Random(5).randbytes(3000)
    journal.write_bytes(garbage)

    code, stderr = _run(tmp_path, "--run-dir", "run")

    _assert_refused(code, stderr, str(journal), "line 1", "--run-dir")
    assert journal.read_bytes() == garbage


@pytest.mark.parametrize("where", ["default", "storage"])
def test_a_corrupt_middle_line_is_refused_untouched(tmp_path: Path, where: str) -> None:
    if where == "default":
        journal, flags = tmp_path / "run" / "optuna.journal", ["--run-dir", "run"]
    else:
        journal = tmp_path / "shared.journal"
        flags = ["--storage", "shared.journal", "--run-dir", "run"]
    lines = _journal_with_trials(journal).splitlines(keepends=True)
    lines[2] = b'{"op_code":5,"worker_id":"w","trial_id":0,"param_name":"x",,}\n'
    damaged = b"".join(lines)
    journal.write_bytes(damaged)

    code, stderr = _run(tmp_path, *flags)

    _assert_refused(code, stderr, str(journal), "line 3", "backup")
    assert journal.read_bytes() == damaged


def test_a_corrupt_complete_last_line_is_refused_untouched(tmp_path: Path) -> None:
    # Only a last line without its newline can be a cut-off write; this one was finished.
    journal = tmp_path / "shared.journal"
    valid = _journal_with_trials(journal)
    damaged = valid + TORN + b"\n"
    journal.write_bytes(damaged)

    code, stderr = _run(tmp_path, "--storage", "shared.journal", "--run-dir", "run")

    n_lines = damaged.count(b"\n")
    _assert_refused(code, stderr, str(journal), f"line {n_lines}", "--storage")
    assert journal.read_bytes() == damaged


@pytest.mark.parametrize(
    "text", [b"notes about the study\nlearning rate 0.1\n", b"just one line, no newline"],
    ids=["lines", "no-newline"],
)  # fmt: skip
def test_a_text_file_given_as_storage_is_refused_untouched(tmp_path: Path, text: bytes) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(text)

    code, stderr = _run(tmp_path, "--storage", "notes.txt", "--run-dir", "run")

    _assert_refused(code, stderr, str(notes), "not an Optuna journal", "--storage")
    assert notes.read_bytes() == text
    assert not (tmp_path / "run").exists()


def test_an_sqlite_file_given_as_a_journal_path_says_how_to_name_it(tmp_path: Path) -> None:
    database = tmp_path / "study.db"
    with sqlite3.connect(database) as connection:
        connection.execute("create table t (x integer)")
    before = database.read_bytes()

    code, stderr = _run(tmp_path, "--storage", "study.db", "--run-dir", "run")

    _assert_refused(code, stderr, str(database), f"sqlite:///{database}")
    assert database.read_bytes() == before


def test_an_unknown_op_code_is_refused_untouched(tmp_path: Path) -> None:
    journal = tmp_path / "run" / "optuna.journal"
    lines = _journal_with_trials(journal).splitlines(keepends=True)
    lines.insert(4, b'{"op_code":99,"worker_id":"w"}\n')
    damaged = b"".join(lines)
    journal.write_bytes(damaged)

    code, stderr = _run(tmp_path, "--run-dir", "run")

    _assert_refused(code, stderr, str(journal), "line 5", "Optuna")
    assert journal.read_bytes() == damaged


def test_sqlite_in_the_run_directory_is_created_with_it(tmp_path: Path) -> None:
    code, stderr = _run(tmp_path, "--storage", "sqlite:///run/db/study.db", "--run-dir", "run")

    assert code == 0, stderr
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'run' / 'db' / 'study.db'}")
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 2


def test_sqlite_in_a_missing_folder_elsewhere_names_the_folder(tmp_path: Path) -> None:
    code, stderr = _run(tmp_path, "--storage", "sqlite:///no/such/folder/x.db", "--run-dir", "run")

    line = _assert_refused(code, stderr, str(tmp_path / "no" / "such" / "folder"), "mkdir -p")
    assert "running" not in line and "server" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objective.py"]
