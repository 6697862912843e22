"""``report/index.html``: one self-contained page (plotly.js inlined) that opens offline.

Figures come from Optuna's own plotting where it has them (history, importances, parallel
coordinates, slices, Pareto front); the slots' timeline and the durations histogram are drawn
here. Each figure travels as JSON in a ``<script type="application/json">`` block and one small
script draws them all, so tests can read every figure's data straight from the file. Script
errors are written into the page (``#hf-errors``), so a headless browser's DOM dump shows them.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.report import tables

STATE_COLORS = {"COMPLETE": "#2ca02c", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#1f77b4"}


@dataclass
class Figure:
    key: str
    title: str
    figure: Any | None  # a plotly Figure, or None when there is not enough data
    note: str = ""


def build_figures(study: optuna.Study) -> list[Figure]:
    import optuna.visualization as vis

    multi = len(study.directions) > 1
    target, target_name = _first_objective(study) if multi else (None, "Objective Value")
    makers: list[tuple[str, str, Callable[[], Any]]] = [
        (
            "history",
            "Optimisation history",
            lambda: vis.plot_optimization_history(study, target=target, target_name=target_name),
        ),
        ("importances", "Parameter importances", lambda: vis.plot_param_importances(study)),
        (
            "parallel",
            "Parallel coordinates",
            lambda: vis.plot_parallel_coordinate(study, target=target, target_name=target_name),
        ),
        ("slices", "Slices", lambda: vis.plot_slice(study, target=target, target_name=target_name)),
    ]
    if multi:
        makers.insert(1, ("pareto", "Pareto front", lambda: vis.plot_pareto_front(study)))
    figures = [_make(key, title, maker) for key, title, maker in makers]
    trials = tables.finished_trials(study)
    figures.append(Figure("timeline", "Trials per slot", timeline_figure(trials)))
    figures.append(Figure("durations", "Trial durations", durations_figure(trials)))
    return [check_has_data(f) for f in figures]


def _first_objective(study: optuna.Study) -> tuple[Callable[[FrozenTrial], float], str]:
    name = tables.value_columns(study)[0]
    return (lambda t: t.values[0]), name


def _make(key: str, title: str, maker: Callable[[], Any]) -> Figure:
    try:
        return Figure(key, title, maker())
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        # Optuna refuses some plots with too few trials or parameters; say so in the page.
        return Figure(key, title, None, f"not drawn: {exc}")


def check_has_data(figure: Figure) -> Figure:
    """The figure, or in its place a note when it has no points to draw."""
    if figure.figure is not None and not figure_has_data(figure.figure.to_plotly_json()):
        return Figure(figure.key, figure.title, None, "not drawn: no finished trials to show yet")
    return figure


def figure_has_data(spec: dict[str, Any]) -> bool:
    """Whether any trace holds points (x/y/values, or parallel-coordinate dimensions)."""
    for trace in spec.get("data", []):
        for field in ("x", "y", "values"):
            if len(trace.get(field) or ()) > 0:
                return True
        if any(len(d.get("values") or ()) for d in trace.get("dimensions", ())):
            return True
    return False


# ----- figures drawn here --------------------------------------------------------------------


def timeline_figure(trials: list[FrozenTrial]) -> Any:
    """A Gantt chart: one row per slot (labelled with its busy share), one bar per trial."""
    import plotly.graph_objects as go

    labels = slot_labels(trials)
    figure = go.Figure()
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        chosen = [t for t in trials if t.state == state]
        if not chosen:
            continue
        figure.add_trace(
            timeline_bars(
                state.name.lower(),
                chosen,
                labels,
                [
                    f"trial {t.number} {t.state.name.lower()} in {tables.duration_seconds(t)}s"
                    for t in chosen
                ],
                text=[f"#{t.number}" for t in chosen],
                marker_color=STATE_COLORS[state.name],
            )
        )
    timeline_layout(figure, len(labels))
    return figure


def slot_labels(trials: list[FrozenTrial]) -> dict[str, str]:
    """Each slot the trials ran on, labelled with its busy share: the timeline's rows."""
    fractions = tables.busy_fractions(trials)
    return {slot: f"{slot} ({100 * share:.0f}% busy)" for slot, share in fractions.items()}


def timeline_bars(
    name: str, trials: list[FrozenTrial], labels: dict[str, str], hovertext: list[str], **style: Any
) -> Any:
    """One trace of a slot timeline: a bar per trial, on its slot's row, from start to end."""
    import plotly.graph_objects as go

    return go.Bar(
        orientation="h",
        name=name,
        y=[labels[tables.slot_of(t)] for t in trials],
        base=[iso_ms(t.datetime_start) for t in trials],
        x=[1000 * (tables.duration_seconds(t) or 0.0) for t in trials],
        hovertext=hovertext,
        **style,
    )


def timeline_layout(figure: Any, n_slots: int) -> None:
    """A slot timeline's axes: time across, one row per slot, tall enough for ``n_slots``."""
    figure.update_layout(
        barmode="overlay",
        xaxis={"type": "date", "title": "time"},
        yaxis={"title": "slot", "categoryorder": "category descending"},
        height=max(300, 60 + 40 * n_slots),
    )


def iso_ms(stamp: Any) -> str:
    """A datetime as plotly reads it on a date axis, to the millisecond."""
    return str(stamp.isoformat(timespec="milliseconds"))


def durations_figure(trials: list[FrozenTrial]) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        durations = [tables.duration_seconds(t) for t in trials if t.state == state]
        if durations:
            figure.add_trace(
                go.Histogram(
                    x=durations, name=state.name.lower(), marker_color=STATE_COLORS[state.name]
                )
            )
    figure.update_layout(
        barmode="stack", xaxis={"title": "duration (s)"}, yaxis={"title": "trials"}
    )
    return figure


# ----- the page ------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<script>
window.hfErrors = [];
window.onerror = function (message, source, line) {{
  window.hfErrors.push(message + " (" + source + ":" + line + ")");
  var box = document.getElementById("hf-errors");
  if (box) {{ box.textContent = window.hfErrors.join("\\n"); box.hidden = false; }}
}};
</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px;
       padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }}
.meta {{ color: #666; margin-top: 0; }}
section {{ margin: 1.5em 0; }}
.plot {{ width: 100%; min-height: 420px; }}
.note {{ color: #a60; font-style: italic; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }}
th {{ background: #f4f4f4; }}
#hf-errors {{ color: #b00; background: #fee; padding: 0.5em; }}
</style>
<script>{plotlyjs}</script>
</head>
<body>
<pre id="hf-errors" hidden></pre>
<h1>{title}</h1>
<p class="meta">{meta}</p>
{sections}
<script>
document.querySelectorAll("script.hf-figure").forEach(function (block) {{
  var spec = JSON.parse(block.textContent);
  var target = document.getElementById(block.dataset.target);
  Plotly.newPlot(target, spec.data, spec.layout, {{responsive: true, displaylogo: false}});
}});
</script>
</body>
</html>
"""


def render_page(
    study: optuna.Study, figures: list[Figure], top: list[FrozenTrial], meta: str
) -> str:
    from plotly.offline import get_plotlyjs

    sections = [figure_section(f) for f in figures]
    sections += _nodes_section(tables.finished_trials(study))
    sections.append(_top_table_section(study, top))
    return PAGE.format(
        title=html.escape(f"hyperfleet report: {study.study_name}"),
        meta=html.escape(meta),
        plotlyjs=get_plotlyjs(),
        sections="\n".join(sections),
    )


def figure_section(figure: Figure) -> str:
    heading = f"<h2>{html.escape(figure.title)}</h2>"
    if figure.figure is None:
        note = f'<p class="note">{html.escape(figure.note)}</p>'
        return f'<section id="{figure.key}">{heading}{note}</section>'
    # "</" may not appear inside a script element; "<\/" is the same JSON string.
    data = figure.figure.to_json().replace("</", "<\\/")
    return (
        f'<section id="{figure.key}">{heading}\n'
        f'<div class="plot" id="plot-{figure.key}"></div>\n'
        f'<script type="application/json" class="hf-figure" data-target="plot-{figure.key}">'
        f"{data}</script>\n</section>"
    )


def _nodes_section(trials: list[FrozenTrial]) -> list[str]:
    """On many machines, a row per node: its slots, trials and mean busy share."""
    rows = tables.node_rows(trials)
    if not rows:
        return []
    body = "\n".join(
        f"<tr><td>{html.escape(row.node)}</td><td>{row.slots}</td><td>{row.trials}</td>"
        f"<td>{100 * row.busy_share:.0f}%</td></tr>"
        for row in rows
    )
    return [
        '<section id="nodes"><h2>Nodes</h2>\n<table id="nodes-table"><thead><tr><th>node</th>'
        "<th>slots</th><th>trials</th><th>busy share</th></tr></thead>\n"
        f"<tbody>{body}</tbody></table></section>"
    ]


def _top_table_section(study: optuna.Study, top: list[FrozenTrial]) -> str:
    trials = study.get_trials(deepcopy=False)
    names = tables.columns(study, trials)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for trial in top:
        row = tables.trial_row(study, trial)
        cells = "".join(f"<td>{html.escape(_cell(row.get(n)))}</td>" for n in names)
        rows.append(f"<tr>{cells}</tr>")
    body = "\n".join(rows) or f'<tr><td colspan="{len(names)}">no complete trial</td></tr>'
    return (
        f'<section id="top"><h2>Top {len(top)} trials</h2>\n'
        f'<table id="top-trials"><thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody></table>'
        "</section>"
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def figure_specs(page: str) -> dict[str, dict[str, Any]]:
    """The figures embedded in a page, by key: for tests and tools that check a report."""
    import re

    pattern = re.compile(
        r'<script type="application/json" class="hf-figure" data-target="plot-([\w-]+)">'
        r"(.*?)</script>",
        re.S,
    )
    return {key: json.loads(body) for key, body in pattern.findall(page)}
