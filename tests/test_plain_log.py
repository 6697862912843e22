"""Plain-line mode: a real short search with stdout redirected to a file (not a terminal)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from support.procs import small_search

OBJECTIVE = """
import optuna

def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    if trial.number == 2:
        raise ValueError("trial two fails on purpose")
    return x * x
"""

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def run_cli(tmp_path: Path, *flags: str) -> str:
    """Run a 5-trial search with stdout going to a file, as under nohup or CI."""
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    out = tmp_path / "out.txt"
    with open(out, "w") as stream:
        result = subprocess.run(
            small_search(5, *flags),
            cwd=tmp_path,
            stdout=stream,
            stderr=subprocess.PIPE,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, result.stderr
    return out.read_text()


def test_redirected_stdout_gets_one_timestamped_line_per_trial_start_and_end(
    tmp_path: Path,
) -> None:
    lines = run_cli(tmp_path).splitlines()
    assert lines and all(re.match(STAMP, line) for line in lines), lines
    assert not any("\x1b[" in line for line in lines)  # no terminal control codes
    starts = [
        int(m[1]) for m in (re.search(r"trial (\d+) started on cpu#\d", ln) for ln in lines) if m
    ]
    ends = [
        int(m[1])
        for m in (re.search(r"trial (\d+) (complete|fail) on cpu#\d in", ln) for ln in lines)
        if m
    ]
    assert sorted(starts) == sorted(ends) == [0, 1, 2, 3, 4]
    assert any(
        "trial 2 fail" in ln and "ValueError: trial two fails on purpose" in ln for ln in lines
    )
    assert "study objective-objective: 4 complete, 0 pruned, 1 failed" in lines[-1]
    # run.log holds the same plain lines.
    log = (tmp_path / "run" / "run.log").read_text()
    assert all(f"trial {n} started" in log for n in range(5))


def test_quiet_prints_only_the_final_summary(tmp_path: Path) -> None:
    lines = run_cli(tmp_path, "--quiet").splitlines()
    assert len(lines) == 1, lines
    assert re.match(
        STAMP + r"study objective-objective: 4 complete, 0 pruned, 1 failed; "
        r"best trial \d+: ",
        lines[0],
    )
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.count("started on") == 5  # the run log still tells everything
