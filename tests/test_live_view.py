"""The live view drawn from a hand-built state to a capturing console, at 80 and 160 columns."""

from __future__ import annotations

import io
import re
from collections import deque

import pytest
from rich.console import Console

from hyperfleet.display.events import Notice, RunEnded, RunStarted, Tick
from hyperfleet.display.live import LiveView
from hyperfleet.display.render import render, time_left
from hyperfleet.display.runstate import RunState, SlotView, StudyView, TrialRecord
from hyperfleet.resources.monitor import GpuSample

NOW = 1_700_000_000.0
LONG_PARAMS = {f"parameter_number_{i}": 0.001 * (i + 1) for i in range(15)}


def make_state() -> RunState:
    state = RunState("mnist-search", "/runs/mnist", started=NOW - 185, timeout=None)
    state.slots = [
        SlotView(
            "gpu0#0",
            "gpu",
            (0,),
            (0, 1),
            state="busy",
            trial=17,
            study="mnist",
            since=NOW - 42,
            trials_done=5,
        ),
        SlotView("gpu1#0", "gpu", (1,), (2, 3), state="idle", trials_done=5),
        SlotView(
            "cpu#0",
            "cpu",
            (),
            (4,),
            state="busy",
            trial=18,
            study="mnist",
            since=NOW - 7,
            cpu_percent=97.0,
            trials_done=6,
        ),
    ]
    state.gpus = {0: GpuSample(0, 87.0, 12 * 1024, 80 * 1024), 1: GpuSample(1, 3.0, 512, 80 * 1024)}
    state.studies = [
        StudyView(
            "mnist",
            ("MINIMIZE",),
            n_trials=40,
            complete=12,
            pruned=3,
            failed=1,
            running=2,
            finished=16,
            best_number=9,
            best_values=[0.0123],
            best_params=LONG_PARAMS,
        )
    ]
    state.recent = deque(
        [
            TrialRecord(
                "mnist",
                16,
                "gpu1#0",
                "FAIL",
                reason="out of memory: CUDA out of memory",
                start=NOW - 30,
                end=NOW - 20,
            ),
            TrialRecord(
                "mnist",
                15,
                "gpu0#0",
                "COMPLETE",
                params={"lr": 0.00123, "layers": 3},
                values=[0.0456],
                start=NOW - 60,
                end=NOW - 43,
            ),
        ]
    )
    return state


def draw(state: RunState, width: int) -> list[str]:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(state, width, now=NOW))
    return console.export_text().splitlines()


def row(lines: list[str], first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in lines:
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row starting with {first!r} in:\n" + "\n".join(lines))


@pytest.mark.parametrize("width", [80, 160])
def test_rows_hold_the_right_numbers(width: int) -> None:
    lines = draw(make_state(), width)
    assert all(len(line) <= width for line in lines)
    assert row(lines, "gpu0#0")[:5] == ["gpu0#0", "busy", "17", "mnist", "42s"]
    assert "87%" in row(lines, "gpu0#0") and "12.0/80G" in row(lines, "gpu0#0")
    assert row(lines, "gpu1#0")[:3] == ["gpu1#0", "idle", "-"]
    assert "0.5/80G" in row(lines, "gpu1#0")
    assert row(lines, "cpu#0")[:5] == ["cpu#0", "busy", "18", "mnist", "7.0s"]
    assert "97%" in row(lines, "cpu#0")
    assert row(lines, "mnist")[:7] == ["mnist", "12", "2", "3", "1", "#9", "0.0123"]
    assert row(lines, "16")[:4] == ["16", "gpu1#0", "FAIL", "-"]
    assert "out of memory" in " ".join(row(lines, "16"))
    assert row(lines, "15")[:5] == ["15", "gpu0#0", "COMPLETE", "0.0456", "17s"]
    header = "\n".join(lines[:2])
    assert "16/40 trials (40%)" in header
    # 16 trials in this run took 185 s, so 24 more take about 277 s.
    assert "~4m37s left" in header
    assert "Ctrl+C to stop" in lines[-1]


@pytest.mark.parametrize("width", [80, 160])
def test_long_parameter_lists_are_shortened_on_one_line(width: int) -> None:
    lines = draw(make_state(), width)
    study_row = next(line for line in lines if line.split()[:1] == ["mnist"])
    assert study_row.rstrip().endswith("…")
    assert "parameter_number_0=0.001" in study_row
    assert "parameter_number_14" not in "\n".join(lines)
    # Nothing of the list spills onto a line of its own.
    assert sum("parameter_number" in line for line in lines) == 1


def test_wider_terminal_shows_more_parameters() -> None:
    def shown(width: int) -> int:
        return len(re.findall(r"parameter_number_\d+=", "\n".join(draw(make_state(), width))))

    assert shown(160) > shown(80) >= 1


def test_footer_says_it_is_stopping_after_ctrl_c() -> None:
    state = make_state()
    state.stopping = 1
    assert "stopping: waiting for 2 running trial(s)" in draw(state, 80)[-1]
    state.stopping = 2
    assert "terminating running trials" in draw(state, 80)[-1]


def test_live_view_draws_on_tick_and_prints_the_summary_at_the_end() -> None:
    stream = io.StringIO()
    view = LiveView(Console(file=stream, width=100, force_terminal=True))
    state = make_state()
    view.handle(RunStarted(state))
    view.handle(Tick(state))
    view.handle(Notice(state, "slot gpu1#0 stopped: its worker keeps dying"))
    view.handle(RunEnded(state))
    output = stream.getvalue()
    assert "gpu0#0" in output
    assert "slot gpu1#0 stopped: its worker keeps dying" in output
    assert "study mnist: 12 complete, 3 pruned, 1 failed; best trial 9: 0.0123" in output


@pytest.mark.parametrize("width", [80, 160])
def test_with_several_studies_each_last_trial_says_its_study(width: int) -> None:
    state = make_state()
    state.studies.append(StudyView("cifar", ("MAXIMIZE",), n_trials=10))
    state.recent[0].study = "cifar"
    lines = draw(state, width)
    assert all(len(line) <= width for line in lines)
    assert row(lines, "16")[:3] == ["16", "cifar", "gpu1#0"]
    assert row(lines, "15")[:3] == ["15", "mnist", "gpu0#0"]


def campaign_state() -> RunState:
    """A sequential campaign in its second stage: the iris stage is done, wine runs."""
    state = make_state()
    state.run_name, state.sequential = "tabular", True
    state.studies = [
        StudyView("xgb-iris", ("MINIMIZE",), n_trials=10, finished=10, stage=0, stage_name="iris"),
        StudyView("cat-iris", ("MINIMIZE",), n_trials=10, finished=10, stage=0, stage_name="iris"),
        StudyView(
            "xgb-wine",
            ("MINIMIZE",),
            n_trials=10,
            finished=4,
            running=1,
            stage=1,
            stage_name="wine",
            timeout=3600,
            ends_at=NOW + 1500,
        ),
        StudyView("cat-wine", ("MINIMIZE",), stage=1, stage_name="wine", timeout=600),
    ]
    state.slots[0].study, state.slots[0].experiment = "xgb-wine", "policy_heavy"
    state.recent[1].study, state.recent[1].experiment = "xgb-wine", "baseline"
    return state


@pytest.mark.parametrize("width", [80, 160])
def test_a_campaign_shows_its_stage_each_studys_budget_left_and_the_time_to_finish(
    width: int,
) -> None:
    lines = draw(campaign_state(), width)
    assert all(len(line) <= width for line in lines)
    header = "\n".join(lines[:2])
    assert "stage wine (2 of 2)" in header
    # The trials left (6) take about 69 s at this run's pace; cat-wine, with a time budget
    # only, has not started its 10 minutes yet: the campaign ends when they are over.
    assert "~10m00s left" in header
    assert row(lines, "xgb-iris")[:7] == ["xgb-iris", "0", "0", "0", "0", "-", "0"]
    assert "6, 25m00s" in " ".join(row(lines, "xgb-wine"))
    assert "10m00s" in row(lines, "cat-wine")
    shown = "xgb-wine: policy_heavy" if width > 80 else "xgb-wine: polic"
    assert shown in " ".join(row(lines, "gpu0#0"))
    assert "baseline: lr=0.00123" in " ".join(row(lines, "15"))


def test_the_stage_moves_on_when_the_earlier_one_has_nothing_left() -> None:
    state = campaign_state()
    state.studies[1].finished = 7  # cat-iris still has trials to run
    header = "\n".join(draw(state, 160)[:2])
    assert "stage iris (1 of 2)" in header
    state.sequential = False
    assert "stage" not in "\n".join(draw(state, 160)[:2])


def test_the_time_left_ends_with_a_study_whose_clock_runs_out_first() -> None:
    # 16 trials in 185 s: the 90 trials left would take about 17 min at this pace, but the
    # study's own timeout ends it in 2 s.
    state = make_state()
    state.studies = [
        StudyView("mnist", ("MINIMIZE",), n_trials=100, finished=10, running=2, timeout=60,
                  ends_at=NOW + 2)
    ]  # fmt: skip
    assert time_left(state, 185.0, NOW) == pytest.approx(2.0)
    assert "~2.0s left" in "\n".join(draw(state, 160)[:2])
    state.studies[0].ends_at = NOW + 3600  # a clock that ends after the trials: the pace says
    assert time_left(state, 185.0, NOW) == pytest.approx(90 * 185 / 16)
