"""A worker process driven message by message, as the controller drives it: what it does when
the controller tells it something while one of its trials waits for an answer."""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from hyperfleet.workers.protocol import (
    Call,
    Finished,
    Load,
    Loaded,
    ObjectiveSpec,
    Ready,
    Release,
    Reply,
    RunTrial,
    Shutdown,
    StudyInfo,
    WorkerSetup,
)
from hyperfleet.workers.runner import serve

OBJECTIVE = """
def objective(trial):
    return trial.suggest_float("x", 0.0, 1.0) + trial.suggest_float("y", 0.0, 1.0)
"""


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Connection]:
    """A worker process with two studies' objectives loaded, "ended" and "running"."""
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    spec = ObjectiveSpec("file", name="objective", location=str(tmp_path / "objective.py"))
    context = multiprocessing.get_context("spawn")
    controller, theirs = context.Pipe()
    process = context.Process(target=serve, args=(theirs,))
    process.start()
    theirs.close()
    controller.send(WorkerSetup({"ended": spec, "running": spec}, "cpu#0"))
    assert isinstance(controller.recv(), Ready)
    for study in ("ended", "running"):
        controller.send(Load(study))
        assert controller.recv() == Loaded(study)
    yield controller
    controller.send(Shutdown())
    process.join(30)
    assert process.exitcode == 0


def run_trial(controller: Connection, tmp_path: Path, number: int) -> None:
    study = StudyInfo("running", ("MINIMIZE",))
    controller.send(RunTrial("running", number, str(tmp_path / f"trial{number}"), None, study))


def answer(controller: Connection, value: float) -> None:
    call = controller.recv()
    assert isinstance(call, Call) and call.name == "suggest_float"
    controller.send(Reply(value))


def test_a_release_sent_while_a_trial_waits_for_an_answer_waits_for_the_trial(
    worker: Connection, tmp_path: Path
) -> None:
    # Another study ended while this trial was asking for its first parameter: the release
    # comes before the answer, and the trial must still get its answer, not the release.
    run_trial(worker, tmp_path, 0)
    assert isinstance(worker.recv(), Call)
    worker.send(Release("ended"))
    worker.send(Reply(0.25))
    answer(worker, 0.5)
    finished: Finished = pickle.loads(worker.recv_bytes())
    assert (finished.outcome, finished.value) == ("returned", 0.75), finished
    # The release was kept for after the trial; the next trial runs as usual.
    run_trial(worker, tmp_path, 1)
    answer(worker, 0.125)
    answer(worker, 0.125)
    finished = pickle.loads(worker.recv_bytes())
    assert (finished.outcome, finished.value) == ("returned", 0.25), finished
