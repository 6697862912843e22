"""The slot table on its own, without a run: its states and moves, and the claims a slot takes
and gives back with them (resources in the ledger, fair share in the share book)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hyperfleet.controller.slot_table import ActiveTrial, SlotState, SlotTable
from hyperfleet.controller.study_run import StudyPlan, StudyRun
from hyperfleet.display.runstate import RunState, StudyView, TrialRecord
from hyperfleet.resources.shapes import Ledger
from hyperfleet.resources.slots import Slot
from hyperfleet.store.rundir import RunDir
from hyperfleet.workers.protocol import ObjectiveSpec

GPU = {"gpu0": 1.0}


def two_slots_on_one_gpu() -> tuple[SlotTable, RunState]:
    """Two slots that each need all of GPU 0: only one may hold it at a time."""
    slots = [Slot("a", "gpu", gpus=(0,)), Slot("b", "gpu", gpus=(0,))]
    state = RunState(run_name="r", run_dir="r")
    return SlotTable(slots, Ledger({"a": GPU, "b": GPU}), state), state


def a_run(tmp_path: Path) -> StudyRun:
    study = optuna.create_study()
    plan = StudyPlan(
        "s", ObjectiveSpec("m", "f"), lambda: study, RunDir(tmp_path / "run"), ("a", "b")
    )
    return StudyRun(plan, StudyView("s", ()), study=study)


def an_active_trial(run: StudyRun) -> ActiveTrial:
    assert run.study is not None
    trial = run.study.ask()
    return ActiveTrial(run, trial, TrialRecord("s", trial.number, "a", "RUNNING"), 0.0, None)


def test_slots_start_as_starting_and_their_views_follow_each_move() -> None:
    table, state = two_slots_on_one_gpu()
    assert [view.state for view in state.slots] == ["starting", "starting"]
    table.move("a", SlotState.IDLE)
    assert table.state_of("a") == SlotState.IDLE and state.slot("a").state == "idle"


def test_a_move_the_state_machine_does_not_allow_is_refused() -> None:
    table, _ = two_slots_on_one_gpu()
    with pytest.raises(RuntimeError, match="cannot go from starting to busy"):
        table.move("a", SlotState.BUSY)
    table.move("a", SlotState.STOPPED)
    with pytest.raises(RuntimeError, match="cannot go from stopped to idle"):
        table.move("a", SlotState.IDLE)


def test_a_busy_slot_holds_its_gpu_and_share_until_its_trial_ends(tmp_path: Path) -> None:
    table, _ = two_slots_on_one_gpu()
    run = a_run(tmp_path)
    for name in ("a", "b"):
        table.move(name, SlotState.IDLE)
    table.begin("a", an_active_trial(run))
    assert table.state_of("a") == SlotState.BUSY
    assert table.room("b") == (False, 1.0)  # the GPU is taken
    assert table.book.running("s") == 1
    ended = table.end("a")
    assert ended.run is run and "a" not in table.active
    assert table.room("b") == (True, 0.0)
    assert table.book.running("s") == 0


def test_a_slot_waiting_for_its_objective_holds_the_trials_claims(tmp_path: Path) -> None:
    table, _ = two_slots_on_one_gpu()
    run = a_run(tmp_path)
    table.move("a", SlotState.IDLE)
    table.hold("a", run, SlotState.LOADING)
    assert table.state_of("a") == SlotState.LOADING and table.loading == {"a": run}
    assert table.room("b")[0] is False and table.book.running("s") == 1
    assert table.stop_holding("a") is run
    assert table.room("b")[0] is True and table.book.running("s") == 0
    assert table.stop_holding("a") is None  # nothing held: nothing given back twice


def test_a_removed_slot_leaves_the_table_and_the_views() -> None:
    table, state = two_slots_on_one_gpu()
    table.dead.add("b")
    table.remove("b")
    assert [slot.name for slot in table.slots] == ["a"]
    assert [view.name for view in state.slots] == ["a"]
    assert not table.dead and not table.knows("b")
