"""optuna-dashboard on a hyperfleet run: ``optuna-dashboard RUN/optuna.journal --artifact-dir``
lists the artifacts each trial uploaded from its worker, and serves their bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.dashboard import dashboard_command, fetch, fetch_json, optuna_dashboard
from support.procs import load_trials, run_cli

pytestmark = pytest.mark.skipif(
    dashboard_command() is None, reason="optuna-dashboard is not installed"
)

OBJECTIVE = Path(__file__).resolve().parent / "support" / "artifact_objective.py"
STUDY = "artifact_objective-uploads_to"


def test_the_dashboard_lists_and_serves_each_trials_artifact(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    search = run_cli(
        ["run", f"{OBJECTIVE}:uploads_to", "--objective-arg", f"store={artifacts}",
         "--n-trials", "3", "--cpu-slots", "2", "--run-dir", "run", "--no-report", "--plain"],
        tmp_path,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr
    trials = {t.number: t for t in load_trials(tmp_path / "run", STUDY)}
    journal = str(tmp_path / "run" / "optuna.journal")

    with optuna_dashboard(journal, artifacts, tmp_path / "dashboard.log") as url:
        (study,) = fetch_json(f"{url}/api/studies")["study_summaries"]
        assert study["study_name"] == STUDY
        detail = fetch_json(f"{url}/api/studies/{study['study_id']}")
        assert sorted(t["number"] for t in detail["trials"]) == sorted(trials)
        for shown in detail["trials"]:
            (artifact,) = shown["artifacts"]
            assert artifact["filename"] == "model.txt"
            assert artifact["mimetype"] == "text/plain"
            served = fetch(
                f"{url}/artifacts/{study['study_id']}/{shown['trial_id']}/{artifact['artifact_id']}"
            )
            x = trials[shown["number"]].params["x"]
            assert served == f"trial {shown['number']}: x={x!r}\n".encode()
