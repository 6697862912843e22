"""The campaign's own report: its studies side by side.

``RUN_DIR/report/`` at a campaign's root holds ``index.html`` (the studies' table, each
study's best value over time, and the slots' timeline of every study) and ``studies.csv``;
``summary.md`` and ``hyperfleet status`` show the same table. Which model and which matrix
values made a study is kept in the study's user attribute ``hyperfleet:campaign`` (written when
the campaign opens it), so the table can be rebuilt from the storage alone.
"""

from __future__ import annotations

import csv
import html
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.display import format as fmt
from hyperfleet.report import html as pages
from hyperfleet.report import tables
from hyperfleet.store.schema import EXPERIMENT_ATTR, is_interrupted

CAMPAIGN_ATTR = "hyperfleet:campaign"  # {"family": "xgb-{dataset}", "matrix": {...}}
REPORT_DIR = "report"
TABLE_NAME = "studies.csv"


@dataclass(frozen=True)
class StudyRow:
    """One study of the campaign, as its table shows it."""

    name: str
    family: str  # the [[study]] name before matrix expansion: which model
    matrix: dict[str, Any]  # the matrix values that made it (which data set)
    best_number: int | None
    best_values: list[float] | None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_experiment: str = ""
    trials: int = 0  # finished: complete, pruned or failed
    failed: int = 0
    running: int = 0
    seconds: float = 0.0  # how long at least one of its trials was running


StudyTrials = tuple[optuna.Study, list[FrozenTrial]]


def read_trials(studies: list[optuna.Study]) -> list[StudyTrials]:
    """Each study with its trials, read once: on a database storage every read is a query,
    and the table and both figures need them."""
    return [(study, study.get_trials(deepcopy=False)) for study in studies]


def study_rows(studies: list[StudyTrials], now: datetime | None = None) -> list[StudyRow]:
    return [study_row(study, trials, now) for study, trials in studies]


def study_row(
    study: optuna.Study, trials: list[FrozenTrial], now: datetime | None = None
) -> StudyRow:
    label = study.user_attrs.get(CAMPAIGN_ATTR)
    label = label if isinstance(label, dict) else {}  # a study of an older version's, unlabelled
    matrix = label.get("matrix")
    states = [t.state for t in trials]
    best = _best(study, trials)
    return StudyRow(
        name=study.study_name,
        family=str(label.get("family") or study.study_name),
        matrix=dict(matrix) if isinstance(matrix, dict) else {},
        best_number=best.number if best is not None else None,
        best_values=list(best.values) if best is not None else None,
        best_params=dict(best.params) if best is not None else {},
        best_experiment=str(best.user_attrs.get(EXPERIMENT_ATTR, "")) if best else "",
        trials=sum(s.is_finished() for s in states),
        failed=sum(t.state == TrialState.FAIL and not is_interrupted(t) for t in trials),
        running=states.count(TrialState.RUNNING),
        seconds=running_seconds(trials, now or datetime.now()),
    )


def _best(study: optuna.Study, trials: list[FrozenTrial]) -> FrozenTrial | None:
    # Several objectives have no single best trial; the study's own report shows the front.
    if len(study.directions) > 1 or not any(t.state == TrialState.COMPLETE for t in trials):
        return None
    return study.best_trial


def running_seconds(trials: list[FrozenTrial], now: datetime) -> float:
    """The time at least one trial ran (see :func:`hyperfleet.report.tables.running_seconds`)."""
    return tables.running_seconds(trials, now)


def matrix_names(rows: list[StudyRow]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.matrix))
    return list(names)


# ----- the table as text ---------------------------------------------------------------------

HEADINGS = ("study", "best", "trial", "trials", "time", "best parameters")


def table_cells(row: StudyRow, variables: list[str]) -> list[str]:
    """The row's cells, in the order of :func:`table_headings`."""
    trial = "-" if row.best_number is None else str(row.best_number)
    if row.best_experiment:
        trial += f" ({row.best_experiment})"
    trials = f"{row.trials}" + (f" ({row.failed} failed)" if row.failed else "")
    if row.running:
        trials += f", {row.running} running"
    return [
        row.name,
        *[fmt.number(row.matrix.get(v, "")) for v in variables],
        fmt.values(row.best_values),
        trial,
        trials,
        fmt.duration(row.seconds),
        " ".join(f"{k}={fmt.number(v)}" for k, v in row.best_params.items()) or "-",
    ]


def table_headings(variables: list[str]) -> list[str]:
    return [HEADINGS[0], *variables, *HEADINGS[1:]]


def markdown_table(rows: list[StudyRow]) -> list[str]:
    variables = matrix_names(rows)
    headings = table_headings(variables)
    right = {"best", "trial", "trials", "time"}
    lines = [
        "| " + " | ".join(headings) + " |",
        "|" + "|".join("---:" if h in right else "---" for h in headings) + "|",
    ]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in table_cells(row, variables)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def text_table(rows: list[StudyRow], indent: str = "  ") -> list[str]:
    """Aligned columns for the terminal; the parameters last, as long as they are."""
    variables = matrix_names(rows)
    grid = [table_headings(variables), *(table_cells(row, variables) for row in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]) - 1)]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in grid
    ]


# ----- the report folder ---------------------------------------------------------------------


def write_campaign_report(run_dir: Path, studies: list[optuna.Study], name: str = "") -> Path:
    """``RUN_DIR/report/index.html`` and ``studies.csv``; returns the folder."""
    folder = run_dir / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    read = read_trials(studies)
    rows = study_rows(read)
    write_table_csv(folder / TABLE_NAME, rows)
    figures = [
        pages.Figure("best-over-time", "Best value over time", best_over_time_figure(read)),
        pages.Figure("timeline", "Trials per slot, all studies", timeline_figure(read)),
    ]
    figures = [pages.check_has_data(f) for f in figures]
    meta = (
        f"{len(studies)} studies, {sum(r.trials for r in rows)} trials; "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S')} from {run_dir}"
    )
    (folder / "index.html").write_text(render_page(name or run_dir.name, rows, figures, meta))
    return folder


def write_table_csv(path: Path, rows: list[StudyRow]) -> None:
    variables = matrix_names(rows)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study", "model", *variables, *CSV_COLUMNS])
        for row in rows:
            writer.writerow(
                [
                    row.name,
                    row.family,
                    *[row.matrix.get(v, "") for v in variables],
                    ", ".join(str(v) for v in row.best_values or []),
                    row.best_number,
                    row.best_experiment,
                    row.trials,
                    row.failed,
                    row.running,
                    round(row.seconds, 3),
                    " ".join(f"{k}={v}" for k, v in row.best_params.items()),
                ]
            )


CSV_COLUMNS = (
    "best_value",
    "best_trial",
    "best_experiment",
    "trials",
    "failed",
    "running",
    "seconds",
    "best_params",
)


def render_page(title: str, rows: list[StudyRow], figures: list[Any], meta: str) -> str:
    from plotly.offline import get_plotlyjs

    sections = [_table_section(rows), _grid_section(rows)]
    sections += [pages.figure_section(f) for f in figures]
    return pages.PAGE.format(
        title=html.escape(f"hyperfleet campaign: {title}"),
        meta=html.escape(meta),
        plotlyjs=get_plotlyjs(),
        sections="\n".join(s for s in sections if s),
    )


def _table_section(rows: list[StudyRow]) -> str:
    variables = matrix_names(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table_headings(variables))
    body = []
    for row in rows:
        link = f'<a href="../studies/{html.escape(_folder(row.name))}/report/index.html">'
        cells = table_cells(row, variables)
        first = f"<td>{link}{html.escape(cells[0])}</a></td>"
        rest = "".join(f"<td>{html.escape(c)}</td>" for c in cells[1:])
        body.append(f"<tr>{first}{rest}</tr>")
    return (
        '<section id="studies"><h2>Studies</h2>\n'
        f'<table id="studies-table"><thead><tr>{head}</tr></thead>\n'
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def _grid_section(rows: list[StudyRow]) -> str:
    """Best values as model x matrix values, when the studies come from a matrix."""
    variables = matrix_names(rows)
    if not variables:
        return ""
    columns = list(dict.fromkeys(_combination(row, variables) for row in rows))
    families = list(dict.fromkeys(row.family for row in rows))
    cell = {(row.family, _combination(row, variables)): row for row in rows}
    head = "<th>model</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for family in families:
        cells = []
        for column in columns:
            row = cell.get((family, column))
            cells.append(f"<td>{html.escape(fmt.values(row.best_values)) if row else ''}</td>")
        body.append(f"<tr><td>{html.escape(family)}</td>{''.join(cells)}</tr>")
    return (
        f'<section id="grid"><h2>Best value: model x {html.escape(", ".join(variables))}</h2>\n'
        f'<table id="best-grid"><thead><tr>{head}</tr></thead>\n'
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def _combination(row: StudyRow, variables: list[str]) -> str:
    return ", ".join(fmt.number(row.matrix[v]) for v in variables if v in row.matrix) or "-"


def _folder(name: str) -> str:
    from hyperfleet.store.rundir import folder_name

    return folder_name(name)


# ----- figures -------------------------------------------------------------------------------


def best_over_time_figure(studies: list[StudyTrials]) -> Any:
    """Each single-objective study's best value so far, at the time each trial completed."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for study, trials in studies:
        if len(study.directions) > 1:
            continue
        times, best = _best_so_far(study, trials)
        if times:
            figure.add_trace(
                go.Scatter(
                    x=times, y=best, name=study.study_name, mode="lines+markers", line_shape="hv"
                )
            )
    figure.update_layout(xaxis={"type": "date", "title": "time"}, yaxis={"title": "best value"})
    return figure


def _best_so_far(study: optuna.Study, trials: list[FrozenTrial]) -> tuple[list[str], list[float]]:
    complete = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.datetime_complete is not None
        and t.values is not None
    ]
    complete.sort(key=lambda t: t.datetime_complete or datetime.min)
    better = min if study.direction == StudyDirection.MINIMIZE else max
    times: list[str] = []
    best: list[float] = []
    for trial in complete:
        value = trial.values[0] if not best else better(best[-1], trial.values[0])
        times.append(pages.iso_ms(trial.datetime_complete))
        best.append(value)
    return times, best


def timeline_figure(studies: list[StudyTrials]) -> Any:
    """One row per slot, one bar per trial, one colour per study."""
    import plotly.graph_objects as go

    finished = {s.study_name: tables.finished_of(trials) for s, trials in studies}
    labels = pages.slot_labels([t for trials in finished.values() for t in trials])
    figure = go.Figure()
    for name, trials in finished.items():
        if not trials:
            continue
        hovertext = [
            f"{name} trial {t.number} {t.state.name.lower()} in {tables.duration_seconds(t)}s"
            for t in trials
        ]
        figure.add_trace(pages.timeline_bars(name, trials, labels, hovertext))
    pages.timeline_layout(figure, len(labels))
    return figure
