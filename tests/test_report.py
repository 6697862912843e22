"""``report/``, ``best/`` and ``summary.md`` from run folders made by real short searches."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hyperfleet.report import ReportError, write_report
from hyperfleet.report.html import figure_has_data, figure_specs
from hyperfleet.store.run_reader import open_run

OBJECTIVE = """
import optuna

def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    layers = trial.suggest_int("layers", 1, 4)
    kind = trial.suggest_categorical("kind", ["relu", "tanh"])
    print(f"hello from trial {trial.number}")
    open("model.txt", "w").write(f"weights {trial.number}")  # cwd is the trial folder
    if trial.number == 3:
        raise ValueError("trial three fails on purpose")
    trial.report(x * x, 0)
    if trial.number == 5:
        raise optuna.TrialPruned()
    return (x - 1) ** 2 + layers + (kind == "tanh")

def two(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    y = trial.suggest_float("y", 0.0, 1.0)
    return x, (1 - x) ** 2 + y
"""

SINGLE_PLOTS = {"history", "importances", "parallel", "slices", "timeline", "durations"}


def run_cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperfleet.app.cli", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-trial search whose report was written at its end (no --no-report)."""
    folder = tmp_path_factory.mktemp("search")
    (folder / "objective.py").write_text(OBJECTIVE)
    result = run_cli(
        folder,
        "run",
        "objective.py:objective",
        "--n-trials",
        "12",
        "--cpu-slots",
        "2",
        "--run-dir",
        "run",
        "--seed",
        "3",
        "--plain",
    )
    assert result.returncode == 0, result.stderr
    assert f"report: {folder / 'run' / 'report' / 'index.html'}" in result.stdout
    return folder / "run"


def load(run_dir: Path) -> optuna.Study:
    return open_run(run_dir).studies[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_rows_match_the_storage(run_dir: Path) -> None:
    study = load(run_dir)
    trials = study.get_trials(deepcopy=False)
    rows = read_csv(run_dir / "report" / "all_trials.csv")
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    for row, trial in zip(rows, trials, strict=True):
        assert row["state"] == trial.state.name
        if trial.values is not None:  # complete, or pruned with its last reported value
            assert float(row["value"]) == pytest.approx(trial.values[0])
        else:
            assert row["value"] == ""
        assert float(row["param_x"]) == pytest.approx(trial.params["x"])
        assert int(row["param_layers"]) == trial.params["layers"]
        assert row["param_kind"] == trial.params["kind"]
        assert row["slot"] in {"cpu#0", "cpu#1"}
        assert float(row["duration_s"]) >= 0
    failed = next(r for r in rows if r["number"] == "3")
    assert failed["state"] == "FAIL" and "trial three fails on purpose" in failed["reason"]
    assert next(r for r in rows if r["number"] == "5")["state"] == "PRUNED"

    complete = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value or 0.0
    )
    top = read_csv(run_dir / "report" / "top_trials.csv")
    assert [int(r["number"]) for r in top] == [t.number for t in complete[:5]]


def test_every_figure_in_the_html_has_data(run_dir: Path) -> None:
    page = (run_dir / "report" / "index.html").read_text()
    specs = figure_specs(page)
    assert set(specs) == SINGLE_PLOTS
    for key, spec in specs.items():
        assert figure_has_data(spec), key
    assert 'class="note"' not in page  # no figure was left out
    timeline = specs["timeline"]
    assert {t["name"] for t in timeline["data"]} == {"complete", "pruned", "fail"}
    assert sum(len(t["text"]) for t in timeline["data"]) == 12
    assert "busy)" in json.dumps(timeline["data"][0]["y"])
    assert "<script src=" not in page  # self-contained: nothing fetched from a server
    assert page.count('<table id="top-trials">') == 1


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_pngs_are_real_images_of_sensible_size(run_dir: Path) -> None:
    for name in ("history", "importances", "timeline", "durations"):
        path = run_dir / "report" / f"{name}.png"
        width, height = png_size(path)
        assert 600 <= width <= 2000 and 300 <= height <= 1500, (name, width, height)
        assert path.stat().st_size > 10_000, name  # drawn content, not an empty canvas


def test_best_folder_holds_the_best_trials_files(run_dir: Path) -> None:
    best = load(run_dir).best_trial
    described = json.loads((run_dir / "best" / "best.json").read_text())
    assert described["number"] == best.number
    assert described["values"] == pytest.approx(best.values)
    assert json.loads((run_dir / "best" / "params.json").read_text()) == best.params
    result = json.loads((run_dir / "best" / "result.json").read_text())
    assert result["number"] == best.number and result["state"] == "COMPLETE"
    assert (
        run_dir / "best" / "stdout.log"
    ).read_text().strip() == f"hello from trial {best.number}"
    assert (run_dir / "best" / "model.txt").read_text() == f"weights {best.number}"


def test_summary_names_the_best_trial(run_dir: Path) -> None:
    best = load(run_dir).best_trial
    summary = (run_dir / "summary.md").read_text()
    assert "| complete | 10 |" in summary and "| fail | 1 |" in summary
    assert f"| {best.number} | {best.value:.4g} |" in summary


def test_report_command_rewrites_with_another_top(run_dir: Path) -> None:
    result = run_cli(run_dir.parent, "report", "run", "--top", "3")
    assert result.returncode == 0, result.stderr
    assert len(read_csv(run_dir / "report" / "top_trials.csv")) == 3
    assert len(read_csv(run_dir / "report" / "all_trials.csv")) == 12


def test_multi_objective_run_keeps_the_pareto_front(tmp_path: Path) -> None:
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    result = run_cli(
        tmp_path,
        "run",
        "objective.py:two",
        "--n-trials",
        "8",
        "--cpu-slots",
        "2",
        "--direction",
        "minimize",
        "--direction",
        "minimize",
        "--run-dir",
        "run",
        "--no-report",
        "--plain",
    )
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    assert not (run_dir / "report").exists()
    front = sorted(t.number for t in load(run_dir).best_trials)
    described = json.loads((run_dir / "best" / "best.json").read_text())
    assert [t["number"] for t in described["pareto_front"]] == front
    assert sorted(p.name for p in (run_dir / "best").glob("trial-*")) == sorted(
        f"trial-{n}" for n in front
    )
    folder = write_report(run_dir)
    specs = figure_specs((folder / "index.html").read_text())
    assert "pareto" in specs and figure_has_data(specs["pareto"])
    assert png_size(folder / "pareto.png")[0] >= 600
    assert len(read_csv(folder / "top_trials.csv")) == 5


def test_missing_plotting_libraries_cost_one_line_not_the_run(tmp_path: Path) -> None:
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    hide_plotly = (
        "import sys; sys.modules['plotly'] = None; from hyperfleet.app.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            hide_plotly,
            "run",
            "objective.py:objective",
            "--n-trials",
            "2",
            "--cpu-slots",
            "1",
            "--run-dir",
            "run",
            "--plain",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if "report skipped" in line]
    assert len(skipped) == 1 and "pip install 'hyperfleet[report]'" in skipped[0]
    assert (tmp_path / "run" / "summary.md").exists()


def test_report_on_a_folder_without_a_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="--top must be at least 1"):
        write_report(tmp_path, top=0)
    with pytest.raises(Exception, match="holds no hyperfleet run"):
        write_report(tmp_path)
