"""``hyperfleet status`` on a real run folder, while the search runs and after it ended."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from hyperfleet.app.status import format_status, status
from hyperfleet.errors import HyperfleetError
from support.procs import small_search

# Trial 0 holds its slot until the test creates "release", so the test can look at a run that
# is still going; the other trials are instant.
OBJECTIVE = """
import time
from pathlib import Path

import optuna

HERE = Path(__file__).parent

def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    if trial.number == 0:
        (HERE / "trial0-started").write_text("yes")
        deadline = time.monotonic() + 120
        while not (HERE / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    if trial.number == 3:
        raise ValueError("trial three fails on purpose")
    return (x - 1) ** 2
"""


def wait_for(condition: object, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperfleet.app.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_while_running_and_after(tmp_path: Path) -> None:
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    run_dir = tmp_path / "run"
    search = subprocess.Popen(
        small_search(6),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (tmp_path / "trial0-started").exists(), "trial 0 to start")
        # The other slot finishes trials 1-5 (one of them trial 3, which fails) meanwhile.
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal"))
        )
        study = optuna.load_study(study_name="objective-objective", storage=storage)

        def others_done() -> bool:
            states = [t.state for t in study.get_trials(deepcopy=False)]
            return states.count(optuna.trial.TrialState.RUNNING) == 1 and len(states) == 6

        wait_for(others_done, "trials 1-5 to finish")
        live = status(run_dir)
        assert live["active"] is True
        assert [r["number"] for r in live["running"]] == [0]
        assert live["running"][0]["slot"] in {"cpu#0", "cpu#1"}
        assert live["running"][0]["elapsed_s"] >= 0
        (study_status,) = live["studies"]
        assert study_status["counts"]["complete"] == 4
        assert study_status["counts"]["fail"] == 1
        assert study_status["counts"]["running"] == 1
        assert {s["name"] for s in live["slots"]} == {"cpu#0", "cpu#1"}
        text = cli(tmp_path, "status", "run").stdout
        assert "running trials: 1" in text and "trial 0 on cpu#" in text
    finally:
        (tmp_path / "release").write_text("go")
        _, err = search.communicate(timeout=120)
    assert search.returncode == 0, err

    done = status(run_dir)
    assert done["active"] is False
    assert done["running"] == []
    (study_status,) = done["studies"]
    assert study_status["counts"]["complete"] == 5
    best = study.best_trial
    assert study_status["best"] == [
        {"number": best.number, "values": best.values, "params": best.params, "experiment": None}
    ]
    assert study_status["last_failure"]["number"] == 3
    assert "trial three fails on purpose" in study_status["last_failure"]["reason"]
    slots = {s["name"]: s for s in done["slots"]}
    assert sum(s["trials_done"] for s in slots.values()) == 6
    for slot in slots.values():
        assert 0.0 < slot["busy_fraction"] <= 1.0
    # The slot that held trial 0 was busy for most of the run.
    assert max(s["busy_fraction"] for s in slots.values()) > 0.5

    as_json = json.loads(cli(tmp_path, "status", "run", "--json").stdout)
    assert as_json["studies"][0]["counts"] == study_status["counts"]
    text = format_status(done)
    assert "not running" in text
    assert f"best trial {best.number}:" in text
    assert "5 complete, 1 fail" in text


def test_status_of_a_folder_without_a_run_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(HyperfleetError, match="holds no hyperfleet run"):
        status(tmp_path)
    result = cli(tmp_path, "status", str(tmp_path))
    assert result.returncode == 2
    assert "pass the folder a search wrote" in result.stderr
    assert not (tmp_path / "optuna.journal").exists()  # looking wrote nothing
