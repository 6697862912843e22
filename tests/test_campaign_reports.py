"""A campaign's reports never hold up a stop: SIGTERM while they are written ends them at once,
and after a SIGTERM during the trials none is written."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import psutil

from support.procs import campaign_files, cli_command, cpu_only_env, signal_when

OBJECTIVE = """
import time
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    (FOLDER / "started").touch()
    while (FOLDER / "hold").exists():  # the test removes it to let trials end
        time.sleep(0.02)
    return x
"""

CAMPAIGN = """
    [campaign]
    name = "reports"

    [pool]
    cpu_slots = 1

    [defaults]
    objective = "objective.py:objective"
    slot = "cpu"
    n_trials = 2

    [[study]]
    name = "one"

    [[study]]
    name = "two"

    [[study]]
    name = "three"
"""


def start(folder: Path, hold: bool) -> tuple[subprocess.Popen[str], Path]:
    campaign_files(folder, CAMPAIGN, OBJECTIVE)
    if hold:
        (folder / "hold").touch()
    output = folder / "controller.out"
    command = cli_command("run", "campaign.toml", "--plain", "--stop-grace", "0.2")
    with output.open("w") as out:
        process = subprocess.Popen(
            command, cwd=folder, env=cpu_only_env(), stdout=out, stderr=subprocess.STDOUT, text=True
        )
    return process, output


def report_processes(controller: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(controller).children():
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            if "hyperfleet.report.batch" in child.cmdline():
                found.append(child)
    return found


def test_sigterm_while_the_reports_are_written_ends_them_at_once(tmp_path: Path) -> None:
    process, output = start(tmp_path, hold=False)
    batch = signal_when(
        process, signal.SIGTERM, lambda: report_processes(process.pid), "the report processes"
    )
    assert "reports stopped; write them with: hyperfleet report" in output.read_text()
    _, alive = psutil.wait_procs(batch, timeout=10)
    assert not alive  # the report processes were killed with the run, not left writing


def test_after_a_sigterm_during_the_trials_no_report_is_written(tmp_path: Path) -> None:
    process, output = start(tmp_path, hold=True)
    signal_when(process, signal.SIGTERM, (tmp_path / "started").exists, "the first trial")
    assert "reports skipped; write them with: hyperfleet report" in output.read_text()
    assert not list((tmp_path / "runs" / "reports").glob("studies/*/report/index.html"))
