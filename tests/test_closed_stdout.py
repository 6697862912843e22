"""``hyperfleet run ... | head``: the reader closes the pipe early, and the search goes on to its
budget with every line in run.log; no path ends a run with exit status 0 and trials RUNNING.
The same for the live view (rich would end the process) under ``hyperfleet.optimize``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.procs import cli_command, cpu_only_env, wait_until

# Each trial says it started; trial 0 runs until the test has closed the pipe, the others
# until it releases them, so the first line written after the close (trial 0's end, or the
# live view's next frame) finds trials running.
OBJECTIVE = """
import os
import time
from pathlib import Path

def objective(trial):
    folder = Path(os.environ["TEST_FOLDER"])
    (folder / f"started-{trial.number}").touch()
    gate = folder / ("closed" if trial.number == 0 else "release")
    while not gate.exists():
        time.sleep(0.02)
    return trial.suggest_float("x", 0.0, 1.0)
"""
N_TRIALS = 4

# The API with the live view; what became of the trials goes to stderr, stdout being closed.
SCRIPT = f"""
import json, sys
import optuna, hyperfleet
from objective import objective

if __name__ == "__main__":
    study = optuna.create_study(study_name="s")
    outcome = hyperfleet.optimize(
        study, objective, {N_TRIALS}, cpu_slots=2, run_dir="run", display="live", report=False
    )
    states = [trial.state.name for trial in study.trials]
    print(json.dumps({{"status": outcome.status, "states": states}}), file=sys.stderr)
"""

CLI = cli_command(
    "run", "objective.py:objective", "--n-trials", str(N_TRIALS), "--cpu-slots", "2",
    "--run-dir", "run", "--study-name", "s", "--no-report", "--plain",
)  # fmt: skip


@pytest.mark.parametrize("view", ["plain", "live"])
def test_a_closed_stdout_does_not_end_the_search(tmp_path: Path, view: str) -> None:
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    (tmp_path / "search.py").write_text(SCRIPT)
    args = CLI if view == "plain" else [sys.executable, "search.py"]
    env = cpu_only_env()
    path = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    env.update(TEST_FOLDER=str(tmp_path), PYTHONPATH=path)
    process = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run_log = tmp_path / "run" / "run.log"
    try:
        wait_until(
            lambda: (tmp_path / "started-1").exists() or process.poll() is not None,
            60,
            "both slots busy",
        )
        assert process.stdout is not None
        process.stdout.close()  # what `head` does once it has its lines
        (tmp_path / "closed").touch()  # trial 0 ends: its line meets the closed pipe
        if view == "plain":  # rich draws nothing on a pipe before the end (or a notice)
            wait_until(
                lambda: process.poll() is not None or "output was closed" in run_log.read_text(),
                60,
                "the controller to meet the closed stdout",
            )
        (tmp_path / "release").touch()
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    log = run_log.read_text()
    assert all(f"trial {n} complete" in log for n in range(N_TRIALS)), log
    assert "the screen's output was closed (Broken pipe): the search goes on" in log
    if view == "plain":
        from support.procs import load_trials

        states = [trial.state.name for trial in load_trials(tmp_path / "run", "s")]
    else:
        result = json.loads(stderr.strip().splitlines()[-1])
        assert result["status"] == "completed"
        states = result["states"]
    assert states == ["COMPLETE"] * N_TRIALS
