"""``hyperfleet report RUN_DIR``: ``report/`` with ``index.html``, PNGs and CSV tables.

matplotlib and plotly are the optional ``report`` extra; they are imported only when a report
is written, so the rest of hyperfleet works without them.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from hyperfleet.errors import HyperfleetError

if TYPE_CHECKING:
    import optuna

REPORT_DIR = "report"


class ReportError(HyperfleetError):
    """The report cannot be written."""


def write_report(
    run_dir: str | Path, top: int = 5, study: optuna.Study | None = None, pngs: bool = True
) -> Path:
    """Write ``RUN_DIR/report/`` from the run's storage and return that folder.

    ``study`` skips reopening the storage (the end of a search passes the one it ran, which
    also covers in-memory storage). ``pngs=False`` leaves out the PNGs, most of the cost, and
    does without matplotlib."""
    _require_plotting(pngs)
    from hyperfleet.report import html, png, tables

    if top < 1:
        raise ReportError(f"--top must be at least 1, got {top}; pass --top 5 for example.")
    path = Path(run_dir).absolute()
    if study is None:
        study = _the_study(path)
    folder = path / REPORT_DIR
    folder.mkdir(exist_ok=True)
    best = tables.top_trials(study, top)
    tables.write_csv(folder / "all_trials.csv", study, study.get_trials(deepcopy=False))
    tables.write_csv(folder / "top_trials.csv", study, best)
    with warnings.catch_warnings():
        # Optuna's notes on experimental plots and importance targets mean nothing to a reader.
        warnings.simplefilter("ignore")
        if pngs:
            png.write_pngs(folder, study)
        figures = html.build_figures(study)
    meta = (
        f"{len(study.get_trials(deepcopy=False))} trials, "
        f"{', '.join(d.name.lower() for d in study.directions)}; "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S')} from {path}"
    )
    (folder / "index.html").write_text(html.render_page(study, figures, best, meta))
    return folder


def write_reports(run_dir: str | Path, top: int = 5) -> list[Path]:
    """``hyperfleet report``: the run's report, or for a campaign one per study (in
    ``studies/<name>/report/``) and the campaign's own, first (see
    :mod:`hyperfleet.report.campaign`)."""
    from hyperfleet.store.rundir import RunDir

    _require_plotting()  # before opening the storage, as write_report does
    path = Path(run_dir).absolute()
    studies = _stored_studies(path)
    if len(studies) == 1:
        return [write_report(path, top, study=studies[0])]
    from hyperfleet.report.campaign import write_campaign_report

    folders = [RunDir(path).study_folder(study.study_name).path for study in studies]
    written = [write_report(f, top, study=s) for f, s in zip(folders, studies, strict=True)]
    return [write_campaign_report(path, studies), *written]


def _the_study(path: Path) -> optuna.Study:
    return _stored_studies(path)[0]


def _stored_studies(path: Path) -> list[optuna.Study]:
    from hyperfleet.store.run_reader import open_run

    studies = open_run(path).studies
    if not studies:
        raise ReportError(
            f"the storage of {path} holds no study (or it was in memory); run a search there "
            "with a persistent storage first."
        )
    return studies


def _require_plotting(pngs: bool = True) -> None:
    try:
        import plotly  # noqa: F401

        if pngs:
            import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ReportError(
            f"the report needs matplotlib and plotly ({exc.name} is missing); install them "
            "with: pip install 'hyperfleet[report]'"
        ) from None
