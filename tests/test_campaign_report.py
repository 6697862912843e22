"""The campaign's own report: its studies side by side in ``report/``, ``summary.md`` and
``hyperfleet status``, from one real campaign run (two models x two data sets)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from hyperfleet.report.html import figure_specs
from support.procs import campaign_files, run_cli
from test_report_browser import CHROMIUM, chromium

OBJECTIVE = """
def make(dataset):
    def objective(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        if dataset == "bad":
            raise ValueError("no data")
        return x * x + len(dataset)
    return objective
"""

CAMPAIGN = """
[campaign]
name = "compare"

[pool]
cpu_slots = 2

[defaults]
slot = "cpu"
n_trials = 2
matrix = { dataset = ["iris", "bad"] }
args = { dataset = "{dataset}" }

[[study]]
name = "xgb-{dataset}"
objective = "objective.py:make"

[[study]]
name = "cat-{dataset}"
objective = "objective.py:make"
"""

STUDIES = ("xgb-iris", "xgb-bad", "cat-iris", "cat-bad")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("campaign")
    campaign_files(folder, CAMPAIGN, OBJECTIVE)
    done = run_cli(["run", "campaign.toml", "--plain"], folder, 240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"campaign report: {folder / 'runs/compare/report/index.html'}" in done.stdout
    return folder / "runs" / "compare"


def table_rows(page: str, table_id: str) -> list[list[str]]:
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S)
    assert table is not None, f"no table {table_id}"
    rows = re.findall(r"<tr>(.*?)</tr>", table[1], re.S)
    return [
        [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
        for row in rows
    ]


def test_the_campaign_page_compares_every_study(run_dir: Path) -> None:
    page = (run_dir / "report" / "index.html").read_text()
    head, *rows = table_rows(page, "studies-table")
    assert head == ["study", "dataset", "best", "trial", "trials", "time", "best parameters"]
    by_study = {row[0]: row for row in rows}
    assert list(by_study) == list(STUDIES)
    for name in ("xgb-iris", "cat-iris"):
        assert by_study[name][1] == "iris" and by_study[name][4] == "2"
        assert float(by_study[name][2]) >= 4.0 and by_study[name][6].startswith("x=")
    assert by_study["xgb-bad"][2] == "-" and by_study["xgb-bad"][4] == "2 (2 failed)"
    assert 'href="../studies/xgb-iris/report/index.html"' in page

    grid_head, *grid = table_rows(page, "best-grid")
    assert grid_head == ["model", "iris", "bad"]
    assert [row[0] for row in grid] == ["xgb-{dataset}", "cat-{dataset}"]
    assert all(float(row[1]) >= 4.0 and row[2] == "-" for row in grid)  # "-": no trial completed

    figures = figure_specs(page)
    history = {trace["name"]: trace for trace in figures["best-over-time"]["data"]}
    assert set(history) == {"xgb-iris", "cat-iris"}
    assert all(y >= 4.0 for trace in history.values() for y in trace["y"])
    timeline = {trace["name"]: len(trace["x"]) for trace in figures["timeline"]["data"]}
    assert timeline == dict.fromkeys(STUDIES, 2)

    with open(run_dir / "report" / "studies.csv") as handle:
        written = {row["study"]: row for row in csv.DictReader(handle)}
    assert written["cat-iris"]["model"] == "cat-{dataset}"
    assert written["cat-iris"]["dataset"] == "iris" and written["cat-iris"]["trials"] == "2"


def test_summary_and_status_show_the_same_table(run_dir: Path) -> None:
    summary = (run_dir / "summary.md").read_text()
    assert "## Studies side by side" in summary
    assert "| study | dataset | best | trial | trials | time | best parameters |" in summary
    assert re.search(r"\| xgb-bad \| bad \| - \| - \| 2 \(2 failed\) \|", summary)
    assert "`studies/<name>/trials/<number>/`" in summary

    status = run_cli(["status", str(run_dir)], run_dir, 60)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    start = lines.index("studies side by side:")
    heading = "study dataset best trial trials time best parameters"
    assert lines[start + 1].split() == heading.split()
    assert [line.split()[0] for line in lines[start + 2 : start + 6]] == list(STUDIES)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_the_campaign_page_draws_its_plots_in_a_browser(run_dir: Path, tmp_path: Path) -> None:
    dom = chromium(tmp_path, run_dir / "report" / "index.html", "--dump-dom").stdout
    errors = re.search(r'<pre id="hf-errors"([^>]*)>(.*?)</pre>', dom, re.S)
    assert errors is not None, "the page did not load"
    assert "hidden" in errors[1] and errors[2] == "", f"script errors: {errors[2]}"
    pieces = re.split(r'<div class="plot[^"]*" id="plot-', dom)[1:]
    assert [piece.split('"', 1)[0] for piece in pieces] == ["best-over-time", "timeline"]
    for piece in pieces:
        assert "main-svg" in piece.split("</section>", 1)[0], f"{piece[:20]} was not drawn"
