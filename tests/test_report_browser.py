"""The HTML report in headless Chromium: no script errors, and every plot drawn."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from hyperfleet.report import write_report
from support.procs import small_search

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")

OBJECTIVE = """
import optuna

def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    y = trial.suggest_int("y", 0, 5)
    if trial.number == 2:
        raise ValueError("fails on purpose")
    return (x - 1) ** 2 + y
"""


def chromium(tmp_path: Path, page: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=15000",
            *flags,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_draws_every_plot_without_script_errors(tmp_path: Path) -> None:
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    search = subprocess.run(
        small_search(10),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert search.returncode == 0, search.stderr
    page = write_report(tmp_path / "run") / "index.html"

    dom = chromium(tmp_path, page, "--dump-dom").stdout
    errors = re.search(r'<pre id="hf-errors"([^>]*)>(.*?)</pre>', dom, re.S)
    assert errors is not None, "the page did not load"
    assert "hidden" in errors[1] and errors[2] == "", f"script errors: {errors[2]}"
    containers = re.findall(r'<div class="plot[^"]*" id="plot-([\w-]+)"', dom)
    assert set(containers) == {
        "history",
        "importances",
        "parallel",
        "slices",
        "timeline",
        "durations",
    }
    # Each container's drawn content runs up to the next plot container (or the table).
    pieces = re.split(r'<div class="plot[^"]*" id="plot-', dom)[1:]
    for piece in pieces:
        key = piece.split('"', 1)[0]
        assert "main-svg" in piece.split("</section>", 1)[0], f"plot {key} was not drawn"

    shot = tmp_path / "report.png"
    chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1400,3000")
    assert shot.exists() and shot.stat().st_size > 50_000
