"""Named experiments are named everywhere: the run log, the CSV tables, the summary and
status; a failed one runs again on the next run when the retry policy (``--retry`` too) says so,
and the run says which."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

from support.procs import cpu_only_env, run_cli

OBJECTIVE = """
import os


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    if x > 0.5 and not os.environ.get("FIXED"):
        raise RuntimeError("diverged")
    return x * x
"""

CAMPAIGN = """
[pool]
cpu_slots = 1

[[study]]
name = "hex"
objective = "objective.py:objective"
slot = "cpu"
experiments_only = true
experiments = [
    { name = "small_x", params = { x = 0.1 } },
    { name = "large_x", params = { x = 0.9 } },
]
"""


def test_experiment_names_in_log_tables_summary_and_status_and_a_failed_one_is_retried(
    tmp_path: Path,
) -> None:
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    (tmp_path / "campaign.toml").write_text(textwrap.dedent(CAMPAIGN))
    run_dir = tmp_path / "runs" / "campaign"

    first = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 120)
    assert first.returncode == 0, first.stdout + first.stderr
    log = (run_dir / "run.log").read_text()
    assert "trial 0 (experiment small_x) started on cpu#0" in log
    assert "trial 1 (experiment large_x) fail on cpu#0" in log

    env = {**cpu_only_env(), "FIXED": "1"}
    again = run_cli(["run", "campaign.toml", "--plain", "--retry", "error=1"], tmp_path, 180, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "experiment large_x (trial 1) failed (error) and will be repeated" in again.stdout
    assert "trial 2 (experiment large_x) complete" in again.stdout

    with open(run_dir / "studies" / "hex" / "report" / "all_trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["experiment"], r["state"]) for r in rows] == [
        ("small_x", "COMPLETE"),
        ("large_x", "FAIL"),
        ("large_x", "COMPLETE"),
    ]
    with open(run_dir / "studies" / "hex" / "report" / "top_trials.csv") as handle:
        assert next(csv.DictReader(handle))["experiment"] == "small_x"

    summary = (run_dir / "summary.md").read_text()
    assert "| 0 (small_x) |" in summary
    assert "| large_x | 2 | complete | 0.81 |" in summary
    status = run_cli(["status", str(run_dir)], tmp_path, 60)
    assert "best trial 0 (experiment small_x)" in status.stdout
    assert "experiments: small_x complete 0.01 (trial 0), large_x complete 0.81 (trial 2)" in (
        status.stdout
    )


def test_a_failed_experiment_the_retry_policy_does_not_repeat_is_said(tmp_path: Path) -> None:
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    (tmp_path / "campaign.toml").write_text(textwrap.dedent(CAMPAIGN))
    command = ["run", "campaign.toml", "--plain", "--no-report"]
    assert run_cli(command, tmp_path, 120).returncode == 0
    again = run_cli(command, tmp_path, 120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        "experiment large_x (trial 1) failed (error) and is not repeated: the retry policy "
        'allows no more error retries; to repeat it, raise them (retry = "error=1" in '
        "[campaign], or --retry error=1)"
    ) in again.stdout
