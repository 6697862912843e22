"""``best/`` follows the controller's view of the best trial without reading the study again
after every trial, ties included."""

from __future__ import annotations

from pathlib import Path

import optuna

from hyperfleet.display.events import TrialEnded
from hyperfleet.display.runstate import RunState, StudyView, TrialRecord
from hyperfleet.report.best import BestFolder
from hyperfleet.store.rundir import RunDir


def test_a_tie_for_best_does_not_rebuild_best_after_every_trial(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    study = optuna.create_study(study_name="s")
    reads: list[int] = []

    def get_study() -> optuna.Study:
        reads.append(1)  # each rebuild of best/ reads the study's trials
        return study

    folder = BestFolder(run_dir, get_study)
    # Trials 0 and 1 tie; 1 finished first, so it is the view's best, while Optuna's best trial
    # is the lowest number among the ties: 0. Later trials are worse.
    view = StudyView("s", ("MINIMIZE",), best_number=1, best_values=[1.0])
    state = RunState("run", str(run_dir.path), studies=[view])
    for number, value in [(0, 1.0), (1, 1.0), *((n, 5.0) for n in range(2, 40))]:
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
        record = TrialRecord("s", number, "cpu0", "COMPLETE", values=[value])
        folder.handle(TrialEnded(state, record))

    assert len(reads) == 1
    assert (run_dir.path / "best" / "best.json").is_file()

    view.best_number, view.best_values = 40, [0.5]  # a better trial: best/ follows it
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    folder.handle(TrialEnded(state, TrialRecord("s", 40, "cpu0", "COMPLETE", values=[0.5])))
    assert len(reads) == 2
    assert '"number": 40' in (run_dir.path / "best" / "best.json").read_text()
