"""The run's typed events reach real sinks: plain lines in a stream, status.json in a run
folder, and a screen whose output closes mid-run. No controller and no process: milliseconds."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from hyperfleet.display.events import (
    Broadcast,
    Event,
    Notice,
    PlainLog,
    RunEnded,
    RunStarted,
    Tick,
    TrialEnded,
    TrialStarted,
)
from hyperfleet.display.runstate import RunState, SlotView, StudyView, TrialRecord
from hyperfleet.display.screen import ScreenGuard
from hyperfleet.display.snapshot import StatusSnapshot

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def a_run(run_dir: Path) -> list[Event]:
    """One trial that completes on cpu0 and one notice, from the run's start to its end."""
    state = RunState("demo", str(run_dir), started=1000.0)
    state.slots = [SlotView("cpu0", "cpu", (), (0,)), SlotView("cpu1", "cpu", (), (1,))]
    study = StudyView("demo", ("MINIMIZE",), n_trials=1)
    state.studies = [study]
    record = TrialRecord("demo", 0, "cpu0", "RUNNING", params={"x": 0.5}, start=1001.0)
    ended = TrialRecord(
        "demo", 0, "cpu0", "COMPLETE", {"x": 0.5}, values=[0.25], start=1001.0, end=1003.5
    )
    study.complete, study.best_number, study.best_values = 1, 0, [0.25]
    study.best_params = {"x": 0.5}
    return [
        RunStarted(state),
        TrialStarted(state, record),
        Notice(state, "stopping: waiting for 1 running trial(s)"),
        TrialEnded(state, ended),
        Tick(state),
        RunEnded(state),
    ]


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue().splitlines()
    assert all(STAMP.match(line) for line in text)
    return [STAMP.sub("", line) for line in text]


def test_every_sink_of_a_broadcast_gets_every_event_in_order(tmp_path: Path) -> None:
    first, second = io.StringIO(), io.StringIO()
    sink = Broadcast([PlainLog(first), PlainLog(second)])
    for event in a_run(tmp_path):
        sink.handle(event)
    expected = [
        f"run demo in {tmp_path} on 2 slots: cpu0, cpu1",
        "trial 0 started on cpu0",
        "stopping: waiting for 1 running trial(s)",
        "trial 0 complete on cpu0 in 2.5s: 0.25 {'x': 0.5}",
        "study demo: 1 complete, 0 pruned, 0 failed; best trial 0: 0.25 {'x': 0.5}",
    ]
    assert lines(first) == expected
    assert lines(second) == expected


def test_quiet_plain_log_prints_only_the_summary(tmp_path: Path) -> None:
    stream = io.StringIO()
    log = PlainLog(stream, quiet=True)
    for event in a_run(tmp_path):
        log.handle(event)
    assert lines(stream) == [
        "study demo: 1 complete, 0 pruned, 0 failed; best trial 0: 0.25 {'x': 0.5}"
    ]


def test_a_run_with_nothing_to_run_says_nothing_of_its_slots(tmp_path: Path) -> None:
    stream = io.StringIO()
    start, *_ = a_run(tmp_path)
    start.state.nothing_to_run = True
    PlainLog(stream).handle(start)
    assert stream.getvalue() == ""


def test_status_json_is_written_at_the_start_and_marked_ended_at_the_end(tmp_path: Path) -> None:
    status = StatusSnapshot(tmp_path, every=3600.0)
    start, started, notice, ended, tick, end = a_run(tmp_path)
    status.handle(start)
    written = json.loads((tmp_path / "status.json").read_text())
    assert (written["run_name"], written["ended"]) == ("demo", False)
    assert [slot["name"] for slot in written["slots"]] == ["cpu0", "cpu1"]
    for event in (started, notice, ended, tick):
        status.handle(event)
    assert json.loads((tmp_path / "status.json").read_text())["updated"] == written["updated"]
    status.handle(end)
    final = json.loads((tmp_path / "status.json").read_text())
    assert final["ended"] is True
    assert final["running_s"] == pytest.approx(2.5)  # the trial ran from 1001.0 to 1003.5


class ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_screen_ends_only_the_view_and_run_log_says_so(tmp_path: Path) -> None:
    screen, run_log = ClosedPipe(), io.StringIO()
    guard = ScreenGuard(PlainLog(screen), screen, PlainLog(run_log))
    for event in a_run(tmp_path):
        guard.handle(event)  # the first write raises; the rest never reach the view
    assert lines(run_log) == [
        "the screen's output was closed (Broken pipe): the search goes on; its lines are "
        f"here, and `hyperfleet status {tmp_path}` shows it"
    ]
