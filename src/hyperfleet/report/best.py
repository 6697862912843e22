"""``RUN_DIR/best/`` kept up to date during the search, and ``summary.md`` at its end.

``best/`` is the best trial's folder (its files, ``params.json`` and ``result.json``) plus
``best.json``; for a multi-objective study it holds one ``trial-<number>/`` folder per trial of
the Pareto front. Each also holds ``checkpoint/``, the trial's checkpoint folder, when it kept
one (see ``--keep-checkpoints``). Files are hard-linked when the file system allows (a
checkpoint is not copied on every new best), and the folder is built aside and swapped in, so it
is never half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.display import format as fmt
from hyperfleet.display.events import (
    Event,
    RunEnded,
    RunStarted,
    Tick,
    TrialEnded,
    time_trials,
)
from hyperfleet.display.render import gpu_use, node_cpu, node_memory
from hyperfleet.display.runstate import RunState, TrialClock, TrialRecord
from hyperfleet.report import tables
from hyperfleet.store.rundir import RunDir, write_json
from hyperfleet.store.schema import EXPERIMENT_ATTR, SLOT_ATTR, first_attempt, is_interrupted

BEST_NAME = "best"
REFIT_NAME = "refit"  # best/refit/: what hyperfleet.objective.refit made from the best parameters
CHECKPOINT_NAME = "checkpoint"  # best/checkpoint/: the best trial's checkpoint folder
SUMMARY_NAME = "summary.md"
PARETO_EVERY_SECONDS = 2.0


def best_trials(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """The best trial, or for several objectives the Pareto front; empty before any result.
    ``trials``: the study's trials when the caller has read them already."""
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return []
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    return [study.best_trial]


class BestFolder:
    """Keeps ``best/`` of one study current. With one objective the controller's view says
    when the best trial changes, so the folder is rebuilt only then; a Pareto front costs more
    to compute, so it is rebuilt at most every few seconds, and at the end."""

    def __init__(
        self,
        run_dir: RunDir,
        get_study: Callable[[], optuna.Study | None],
        name: str = "",
        files_written: Callable[[], None] = lambda: None,
        every: float = PARETO_EVERY_SECONDS,
    ) -> None:
        self._run_dir = run_dir
        self._get_study = get_study
        self._name = name
        self._files_written = files_written  # waits for trial files still being written
        self._every = every
        self._shown: list[int] = []
        self._view_best: int | None = None  # the view's best trial the folder was last built for
        self._stale = False
        self._last = 0.0

    def handle(self, event: Event) -> None:
        match event:
            case TrialEnded(state, record):
                self._trial_ended(state, record)
            case Tick():
                self._refresh_if_due()
            case RunStarted():
                self._refresh()  # a resumed run may already have a best trial
            case RunEnded() if self._stale:
                self._refresh()

    def _trial_ended(self, state: RunState, record: TrialRecord) -> None:
        if record.state != "COMPLETE" or (self._name and record.study != self._name):
            return
        view = next((s for s in state.studies if s.name == record.study), None)
        if view is not None and len(view.directions) == 1:
            # Only when the view's best changes: with ties, Optuna's best (the lowest number)
            # may stay another trial than the view's (the first to finish), and comparing the
            # two rebuilt nothing but read the whole study after every trial.
            if view.best_number != self._view_best:
                self._view_best = view.best_number
                self._refresh()
            return
        self._stale = True
        self._refresh_if_due()

    def _refresh_if_due(self) -> None:
        if self._stale and time.monotonic() - self._last >= self._every:
            self._refresh()

    def _refresh(self) -> None:
        self._stale, self._last = False, time.monotonic()
        study = self._get_study()
        if study is None:
            return
        best = best_trials(study)
        numbers = [t.number for t in best]
        if numbers and numbers != self._shown:
            self._files_written()  # best/ links the best trials' folders: complete them first
            write_best(self._run_dir, study, best)
            self._shown = numbers


def write_best(run_dir: RunDir, study: optuna.Study, best: list[FrozenTrial]) -> Path:
    final = run_dir.path / BEST_NAME
    building = run_dir.path / f".{BEST_NAME}.new"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    if len(study.directions) == 1:
        trial = best[0]
        _link_tree(run_dir.existing_trial_dir(trial.number), building)
        _link_checkpoint(run_dir, trial, building)
        write_json(building / "params.json", trial.params)
        write_json(building / "best.json", _describe(study, trial, run_dir))
        _keep_refit_if_same_params(final, building, trial.params)
    else:
        for trial in best:
            folder = building / f"trial-{trial.number}"
            _link_tree(run_dir.existing_trial_dir(trial.number), folder)
            _link_checkpoint(run_dir, trial, folder)
            write_json(folder / "params.json", trial.params)
        front = [_describe(study, t, run_dir) for t in best]
        write_json(building / "best.json", {"pareto_front": front})
    _swap_in(building, final)
    return final


def _keep_refit_if_same_params(final: Path, building: Path, params: dict[str, Any]) -> None:
    """A refit made from the same best parameters still holds: carry ``refit/`` over.

    ``best/`` is rebuilt at every start and on every new best; a refit folder must survive the
    first and go with the second (then the refit runs again after the search).
    """
    old = final / REFIT_NAME
    try:
        previous = json.loads((final / "params.json").read_text())
    except (OSError, ValueError):
        return
    if old.is_dir() and previous == json.loads(json.dumps(params, default=str)):
        shutil.rmtree(building / REFIT_NAME, ignore_errors=True)  # a trial's own "refit" folder
        os.replace(old, building / REFIT_NAME)


def _describe(study: optuna.Study, trial: FrozenTrial, run_dir: RunDir) -> dict[str, Any]:
    return {
        "study": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "number": trial.number,
        "values": trial.values,
        "params": trial.params,
        "slot": trial.system_attrs.get(SLOT_ATTR),
        "trial_folder": str(run_dir.existing_trial_dir(trial.number).relative_to(run_dir.path)),
    }


def _link_checkpoint(run_dir: RunDir, trial: FrozenTrial, folder: Path) -> None:
    checkpoint = run_dir.checkpoint_dir(first_attempt(trial))
    if checkpoint.is_dir():
        _link_tree(checkpoint, folder / CHECKPOINT_NAME)


def _link_tree(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy, dirs_exist_ok=True)
    else:
        target.mkdir(parents=True, exist_ok=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def _swap_in(building: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(final, old)
    os.replace(building, final)
    shutil.rmtree(old, ignore_errors=True)


# ----- summary.md ---------------------------------------------------------------------------


class RunSummary:
    def __init__(
        self,
        run_dir: RunDir,
        get_studies: Callable[[], list[optuna.Study]],
        campaign: bool = False,
    ) -> None:
        self._run_dir = run_dir
        self._get_studies = get_studies
        self._campaign = campaign
        self._clock = TrialClock()

    def handle(self, event: Event) -> None:
        time_trials(self._clock, event)
        match event:
            case RunEnded(state):
                self._write(state)

    def _write(self, state: RunState) -> None:
        path = self._run_dir.path / SUMMARY_NAME
        if state.nothing_to_run and path.exists():
            return  # the last run's summary (its slots and busy shares) stays
        running = self._clock.seconds(time.time())
        path.write_text(summary_markdown(state, self._get_studies(), self._campaign, running))


def summary_markdown(
    state: RunState,
    studies: list[optuna.Study],
    campaign: bool | None = None,
    running: float | None = None,
) -> str:
    """The run's summary; a campaign's (by default: a run of several studies) starts with its
    studies side by side and points at each study's folder. ``running``: the time this run ran
    trials, which the slots' busy shares are of (as in the report); by default its whole time."""
    from hyperfleet.report.campaign import markdown_table, read_trials, study_rows

    campaign = len(studies) > 1 if campaign is None else campaign
    elapsed = time.time() - state.started
    lines = [
        f"# {state.run_name}",
        "",
        f"- run folder: `{state.run_dir}`",
        f"- started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state.started))}, "
        f"ran {fmt.duration(elapsed)}" + (" (stopped early)" if state.stopping else ""),
        "",
    ]
    if campaign and studies:
        table = markdown_table(study_rows(read_trials(studies)))
        lines += ["## Studies side by side", "", *table, ""]
    for study in studies:
        lines += _study_section(study)
    lines += _slots_section(state, elapsed if running is None else running)
    lines += _nodes_section(state, elapsed if running is None else running)
    lines += _packing_section(state)
    lines += [
        "## Files",
        "",
        "- `optuna.journal`: the Optuna storage (optuna-dashboard opens it)",
        "- `run.log`: one line per trial start and end",
        "- `workers/`: what each slot's worker printed outside its trials",
        *(_campaign_folder_lines() if campaign else _folder_lines("")),
        "",
    ]
    return "\n".join(lines)


def _folder_lines(prefix: str) -> list[str]:
    return [
        f"- `{prefix}trials/<number>/`: `params.json`, `result.json`, `stdout.log`, "
        "`stderr.log` and what the objective wrote",
        f"- `{prefix}best/`: the best trial's folder (`best.json` says which)",
        f"- `{prefix}checkpoints/<number>/`: what a trial and its repeats saved to continue "
        "(`--keep-checkpoints` says which stay)",
        f"- `{prefix}report/index.html`: plots and tables (`hyperfleet report` rewrites it)",
    ]


def _campaign_folder_lines() -> list[str]:
    return [
        "- `report/index.html`: the studies side by side (`hyperfleet report` rewrites it)",
        *_folder_lines("studies/<name>/"),
    ]


def _study_section(study: optuna.Study) -> list[str]:
    trials = study.get_trials(deepcopy=False)
    directions = ", ".join(d.name.lower() for d in study.directions)
    lines = [
        f"## Study `{study.study_name}` ({directions})",
        "",
        "| state | trials |",
        "|---|---:|",
        *[f"| {name} | {n} |" for name, n in state_counts(trials).items() if n],
        "",
    ]
    best = best_trials(study)
    if not best:
        return [*lines, "No trial completed.", "", *_experiments_section(trials)]
    title = "Best trial" if len(best) == 1 else f"Pareto front ({len(best)} trials)"
    lines += [f"### {title}", "", "| trial | values | parameters |", "|---:|---|---|"]
    for trial in best:
        params = ", ".join(f"{k}={fmt.number(v)}" for k, v in trial.params.items())
        lines.append(f"| {_trial_cell(trial)} | {fmt.values(trial.values)} | {params} |")
    return [*lines, "", *_experiments_section(trials)]


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state, with the interrupted ones (failed as "interrupted": run again, never
    counted against the budget) apart from those that failed."""
    counts: dict[str, int] = {}
    for state in TrialState:
        counts[state.name.lower()] = 0
        if state == TrialState.FAIL:
            counts["interrupted"] = 0
    for trial in trials:
        interrupted = trial.state == TrialState.FAIL and is_interrupted(trial)
        counts["interrupted" if interrupted else trial.state.name.lower()] += 1
    return counts


def _trial_cell(trial: FrozenTrial) -> str:
    experiment = trial.user_attrs.get(EXPERIMENT_ATTR)
    return f"{trial.number} ({experiment})" if experiment is not None else str(trial.number)


def _experiments_section(trials: list[FrozenTrial]) -> list[str]:
    latest = tables.experiments(trials)
    if not latest:
        return []
    lines = ["### Experiments", "", "| experiment | trial | state | values |", "|---|---:|---|---|"]
    for name, trial in latest.items():
        lines.append(
            f"| {name} | {trial.number} | {trial.state.name.lower()} | {fmt.values(trial.values)} |"
        )
    return [*lines, ""]


def _packing_section(state: RunState) -> list[str]:
    """Auto packing's decisions, each with its reason (none with a fixed trials_per_gpu)."""
    if not state.packing:
        return []
    return ["## GPU packing", "", *(f"- {text}" for text in state.packing), ""]


def _nodes_section(state: RunState, running: float) -> list[str]:
    """On many machines, a row per node: where it joined from, its slots' trials and mean busy
    share this run, and its last reading (CPU, memory, each GPU's use)."""
    if not state.nodes:
        return []
    lines = [
        "## Nodes",
        "",
        "| node | joined from | slots | trials | busy share | last reading |",
        "|---|---|---:|---:|---:|---|",
    ]
    for node in state.nodes.values():
        slots = [slot for slot in state.slots if slot.name.startswith(f"{node.name}/")]
        busy = sum(min(1.0, s.busy_seconds / running) if running > 0 else 0.0 for s in slots)
        share = f"{100 * busy / len(slots):.0f}%" if slots else "-"
        reading = ", ".join(
            [f"cpu {node_cpu(node)}", f"memory {node_memory(node)}"]
            + [gpu_use(sample, index) for index, sample in sorted(node.gpus.items())]
        )
        trials = sum(slot.trials_done for slot in slots)
        lines.append(
            f"| {node.name} | {node.where or '-'} | {len(slots)} | {trials} | {share} | "
            f"{reading if node.state == 'joined' else node.state} |"
        )
    return [*lines, ""]


def _slots_section(state: RunState, running: float) -> list[str]:
    """Each slot's trials and busy time this run; its busy share is of the time the run ran
    trials (from the first start to the last end, gaps when none ran left out), as the report's
    timeline counts it, so that start-up does not count as the slots' idle time."""
    lines = ["## Slots", "", "| slot | trials | busy | busy share |", "|---|---:|---:|---:|"]
    for slot in state.slots:
        share = min(1.0, slot.busy_seconds / running) if running > 0 else 0.0
        lines.append(
            f"| {slot.name} | {slot.trials_done} | {fmt.duration(slot.busy_seconds)} | "
            f"{100 * share:.0f}% |"
        )
    return [*lines, ""]
