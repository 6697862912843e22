"""One search from start to end, shared by ``hyperfleet.optimize`` and ``hyperfleet run``.

Order matters: everything that can be checked without running the objective is checked first,
then the run directory is locked, workers start, and only when a worker has loaded the
objective is the study opened, so bad input writes nothing to storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.cluster.channel import TOKEN_FILE_NAME
from hyperfleet.cluster.hub import ClusterSettings
from hyperfleet.cluster.pools import NodePlanner, single_search_planner
from hyperfleet.config import RunSettings
from hyperfleet.controller.loop import Controller, Outcome, StudyPlan
from hyperfleet.display.events import EventSink, PlainLog
from hyperfleet.display.runstate import RunState, TrialRecord
from hyperfleet.display.snapshot import StatusSnapshot
from hyperfleet.errors import HyperfleetError
from hyperfleet.objective.refit import RefitPlan, run_refit
from hyperfleet.report.best import BEST_NAME, REFIT_NAME, BestFolder, RunSummary
from hyperfleet.resources.inventory import Inventory, detect_inventory
from hyperfleet.resources.packing import PackingSettings
from hyperfleet.resources.shapes import Pool, single_pool
from hyperfleet.resources.slots import PoolOptions, Slot, auto_packing, current_slot, plan_slots
from hyperfleet.store.files import FileWriter
from hyperfleet.store.rundir import NO_ROOM, RunDir, RunDirGone, RunOwner
from hyperfleet.workers.protocol import ObjectiveSpec


@dataclass(frozen=True)
class Display:
    """How the run shows itself: "auto" (live view on a terminal, else plain lines), "live",
    "plain" or "quiet" (only the final summary)."""

    mode: str = "auto"
    stream: TextIO | None = None


@dataclass(frozen=True)
class Search:
    """What one run executes: its studies, the pool they share, and the refits that follow."""

    plans: list[StudyPlan]
    pool: Pool
    refits: dict[str, RefitPlan] = field(default_factory=dict)  # by study name
    sequential: bool = False
    # Many machines: how to cut a node that joins into slots for the studies.
    node_planner: NodePlanner | None = None

    def owner(self, run_dir: RunDir, run_name: str) -> RunOwner:
        """A single search's study owns the run directory (its folders are the top level); a
        campaign's studies each have a folder in ``studies/``, so the campaign owns it."""
        if len(self.plans) == 1 and self.plans[0].folder.path == run_dir.path:
            return RunOwner("study", self.plans[0].name)
        return RunOwner("campaign", run_name)


def prepare_slots(
    options: PoolOptions, inventory: Inventory | None, cluster: ClusterSettings | None = None
) -> tuple[list[Slot], str, PackingSettings | None]:
    """The pool's first slots, how its GPUs were found, and how auto packing may grow it;
    no slot when agents bring them."""
    if cluster is not None:
        return [], "", None
    inventory = inventory if inventory is not None else detect_inventory()
    slots = plan_slots(inventory, options)
    return slots, inventory.note, auto_packing(inventory, options, slots)


def single_search(
    name: str,
    open_study: Callable[[], optuna.Study],
    spec: ObjectiveSpec,
    slots: list[Slot],
    settings: RunSettings,
    run_dir: RunDir,
    refit: RefitPlan | None = None,
    stored_trials: Callable[[], list[FrozenTrial] | None] = lambda: None,
    node_options: PoolOptions | None = None,
) -> Search:
    """One study on every slot: what ``hyperfleet.optimize`` and ``hyperfleet run FILE:FN`` run.

    With ``node_options``, nodes that join are cut into slots with them."""
    plan = StudyPlan(
        name=name,
        spec=spec,
        open_study=open_study,
        folder=run_dir,
        slots=tuple(slot.name for slot in slots),
        n_trials=settings.n_trials,
        stored_trials=stored_trials,
    )
    planner = single_search_planner(name, node_options) if node_options is not None else None
    return Search(
        [plan],
        single_pool(slots),
        {name: refit} if refit is not None else {},
        node_planner=planner,
    )


def run_search(
    search: Search,
    settings: RunSettings,
    run_dir: RunDir,
    display: Display,
    inventory_note: str = "",
    run_name: str = "",
    report: bool = True,
    cluster: ClusterSettings | None = None,
) -> Outcome:
    owner = search.owner(run_dir, run_name)
    run_dir.check_owner(owner)
    fresh = not run_dir.exists()
    run_dir.create(owner)
    run_dir.lock()
    run_log = open(run_dir.run_log, "a")  # noqa: SIM115 (closed in finally)
    controller: Controller | None = None

    def get_study() -> optuna.Study | None:  # the run-folder sinks read it once it is open
        return controller.study if controller is not None else None

    def get_studies() -> list[optuna.Study]:
        return list(controller.studies.values()) if controller is not None else []

    def study_named(name: str) -> Callable[[], optuna.Study | None]:
        return lambda: controller.studies.get(name) if controller is not None else None

    logged = PlainLog(run_log)
    screen = _screen_sinks(display, logged.on_message)
    files = FileWriter()
    try:
        sinks = [
            RunDirGuard(run_dir),  # first: nothing is written into a folder made again
            logged,
            StatusSnapshot(run_dir.path, get_study),
            *[
                BestFolder(plan.folder, study_named(plan.name), plan.name, files.drain)
                for plan in search.plans
            ],
            RunSummary(run_dir, get_studies, campaign=owner.kind == "campaign"),
            *screen,
        ]
        controller = Controller(
            search.plans,
            search.pool,
            settings,
            run_dir,
            sinks,
            run_name,
            search.sequential,
            files=files,
            cluster=cluster,
            node_planner=search.node_planner,
        )
        try:
            return _run_to_the_end(
                search, controller, settings, inventory_note, report, owner.kind == "campaign"
            )
        except (OSError, RunDirGone) as exc:
            return _run_folder_lost(exc, run_dir, controller, screen)
    finally:
        files.close()
        with contextlib.suppress(OSError):  # a full disk fails the flush of the last lines
            run_log.close()
        run_dir.unlock()
        if fresh and (controller is None or controller.study is None):
            # Bad input (an objective that cannot load) stops before the study is opened: leave
            # no run directory behind, so the next attempt starts as clean as this one.
            _remove_all_but_token(run_dir.path)


def _remove_all_but_token(folder: Path) -> None:
    """Remove a run directory that holds nothing of a run yet, but keep its agents' token:
    agents already started with it must still be let in by the next attempt."""
    if not (folder / TOKEN_FILE_NAME).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if entry.name == TOKEN_FILE_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _run_to_the_end(
    search: Search,
    controller: Controller,
    settings: RunSettings,
    inventory_note: str,
    report: bool,
    campaign: bool = False,
) -> Outcome:
    """The search, then each study's refit and report, and a campaign's own report."""
    # The note's first line says how GPUs were found; each next one, a GPU left out and why.
    found, *problems = inventory_note.splitlines() or [""]
    if found.startswith("no GPU"):
        controller.announce(found)
    for problem in problems:
        controller.announce(problem)
    for note in search.pool.notes:
        controller.announce(note)
    with _quiet_optuna(), _stop_on_signals(controller, settings.stop_grace):
        outcome = controller.run()
    searched = outcome.status  # each refit follows the search, whatever another refit did
    for plan in search.plans:
        study = controller.studies.get(plan.name)
        refit = search.refits.get(plan.name)
        if study is not None and refit is not None:
            # With agents, the refit runs on the controller's machine, unpinned.
            slot = next((s for s in search.pool.slots if s.name in plan.slots), current_slot())
            outcome = _refit(refit, outcome, searched, study, plan, slot, controller)
    if report:
        _final_reports(search, controller, campaign)
    return outcome


def _final_reports(search: Search, controller: Controller, campaign: bool) -> None:
    """One study's report here; a campaign's all at once, in a few processes, then the
    campaign's own. A hard stop (a second Ctrl+C) or a SIGTERM writes none: a scheduler's grace
    period would not wait."""
    run_dir = controller.run_dir
    if controller.stopped_in_a_hurry:
        controller.announce(f"reports skipped; write them with: hyperfleet report {run_dir}")
        return
    from hyperfleet.report.batch import ReportsInterrupted, interrupt_on_signals, write_in_parallel

    folders = {
        plan.name: plan.folder.path for plan in search.plans if plan.name in controller.studies
    }
    try:
        with interrupt_on_signals():
            if len(folders) > 1:
                controller.announce(
                    f"writing the reports of {len(folders)} studies; Ctrl+C skips them"
                )
            if len(folders) == 1:
                plan = next(plan for plan in search.plans if plan.name in folders)
                _final_report(plan.folder, controller.studies[plan.name], controller)
            elif folders:
                write_in_parallel(run_dir, folders, controller.announce)
            if campaign and folders:
                _campaign_report(controller)
    except ReportsInterrupted:
        controller.announce(f"reports stopped; write them with: hyperfleet report {run_dir}")


class RunDirGuard(EventSink):
    """Stops the run at its next event once the run directory was deleted or moved: writing on
    would make a new folder (or a new, empty journal) at its path."""

    def __init__(self, run_dir: RunDir) -> None:
        self._run_dir = run_dir

    def on_start(self, state: RunState) -> None:
        self._run_dir.check_still_there()

    def on_trial_start(self, state: RunState, record: TrialRecord) -> None:
        self._run_dir.check_now_and_then()

    def on_trial_end(self, state: RunState, record: TrialRecord) -> None:
        self._run_dir.check_now_and_then()

    def on_message(self, state: RunState, text: str) -> None:
        self._run_dir.check_now_and_then()

    def on_tick(self, state: RunState) -> None:
        self._run_dir.check_still_there()

    def on_end(self, state: RunState) -> None:
        self._run_dir.check_still_there()


def _run_folder_lost(
    exc: OSError | RunDirGone, run_dir: RunDir, controller: Controller, screen: list[EventSink]
) -> Outcome:
    """A failed run (exit status 1) when the run folder can no longer be written: the input was
    fine and the storage holds every trial that ended, so running again resumes."""
    try:
        run_dir.check_still_there()
    except RunDirGone as gone:
        message = f"{gone}; run the same command again to start a new one there"
    else:
        if not isinstance(exc, OSError) or exc.errno not in NO_ROOM:
            raise exc
        where = exc.filename or f"in {run_dir.path}"  # a failed write names no file
        message = (
            f"{NO_ROOM[exc.errno]}: cannot write {where} ({exc.strerror}); make room and "
            "run the same command again to resume"
        )
    for sink in screen:  # the views end as after any run; the run folder's sinks cannot
        sink.on_end(controller.state)
    return Outcome("failed", message, controller.study, {}, list(controller.studies.values()))


def _refit(
    plan: RefitPlan,
    outcome: Outcome,
    searched: str,
    study: optuna.Study,
    study_plan: StudyPlan,
    slot: Slot,
    controller: Controller,
) -> Outcome:
    """Refit on the study's first slot after the search (which ended ``searched``); a failed
    refit fails the run."""
    result = run_refit(
        plan,
        study,
        searched,
        study_plan.folder.path / BEST_NAME / REFIT_NAME,
        slot.environment(),
        controller.announce,
    )
    refits = {**outcome.refits, study_plan.name: result}
    if result.status == "failed":
        return dataclasses.replace(outcome, status="failed", message=result.message, refits=refits)
    return dataclasses.replace(outcome, refits=refits)


def _final_report(folder: RunDir, study: optuna.Study, controller: Controller) -> None:
    """The report is a bonus: missing plotting libraries or a plotting bug cost one line, never
    the search's result."""
    from hyperfleet.report import write_report

    try:
        written = write_report(folder.path, study=study)
        text = f"report: {written / 'index.html'}"
    except HyperfleetError as exc:
        text = f"report skipped: {exc}"
    except Exception as exc:
        text = f"report failed ({type(exc).__name__}: {exc}); retry with: hyperfleet report DIR"
    controller.announce(text)


def _campaign_report(controller: Controller) -> None:
    """The studies side by side in ``report/`` at the campaign's root; a bonus, like the
    studies' own reports."""
    from hyperfleet.report.campaign import write_campaign_report

    path = Path(controller.state.run_dir)
    try:
        written = write_campaign_report(
            path, list(controller.studies.values()), controller.state.run_name
        )
        text = f"campaign report: {written / 'index.html'}"
    except ImportError as exc:
        text = f"campaign report skipped: {exc.name} is missing (pip install 'hyperfleet[report]')"
    except Exception as exc:
        text = (
            f"campaign report failed ({type(exc).__name__}: {exc}); "
            "retry with: hyperfleet report DIR"
        )
    controller.announce(text)


def _screen_sinks(display: Display, note: Callable[[RunState, str], None]) -> list[EventSink]:
    """The view on the screen, which outlives its output's end (see ScreenGuard); ``note``
    tells run.log when it ended."""
    stream = display.stream if display.stream is not None else sys.stdout
    return [ScreenGuard(_screen_view(display.mode, stream), stream, note)]


def _screen_view(mode: str, stream: TextIO) -> EventSink:
    if mode == "quiet":
        return PlainLog(stream, quiet=True)
    if mode == "live" or (mode == "auto" and stream.isatty()):
        live = _live_view(stream)
        if live is not None:
            return live
    return PlainLog(stream)


class ScreenGuard(EventSink):
    """The screen's view, whose output may end before the search: ``hyperfleet run | head``
    closes the pipe after ten lines, a terminal closes. Only the view ends then (a write to it
    raised an OSError, such as EPIPE); the search goes on to its budget and run.log keeps its
    lines, so a closed stdout never leaves trials RUNNING behind a run that looks finished."""

    def __init__(
        self, view: EventSink, stream: TextIO, note: Callable[[RunState, str], None]
    ) -> None:
        self._view, self._stream, self._note = view, stream, note
        self._ended = False

    def on_start(self, state: RunState) -> None:
        self._call(self._view.on_start, state)

    def on_trial_start(self, state: RunState, record: TrialRecord) -> None:
        self._call(self._view.on_trial_start, state, record)

    def on_trial_end(self, state: RunState, record: TrialRecord) -> None:
        self._call(self._view.on_trial_end, state, record)

    def on_message(self, state: RunState, text: str) -> None:
        self._call(self._view.on_message, state, text)

    def on_tick(self, state: RunState) -> None:
        self._call(self._view.on_tick, state)

    def on_end(self, state: RunState) -> None:
        self._call(self._view.on_end, state)

    def _call(self, hook: Callable[..., None], state: RunState, *args: object) -> None:
        if self._ended:
            return
        try:
            hook(state, *args)
        except OSError as exc:
            self._ended = True
            _discard_output(self._stream)
            reason = exc.strerror or type(exc).__name__
            self._note(
                state,
                f"the screen's output was closed ({reason}): the search goes on; its lines are "
                f"here, and `hyperfleet status {state.run_dir}` shows it",
            )


def _discard_output(stream: TextIO) -> None:
    """Point stdout at /dev/null once its reader is gone: what is still buffered, and the
    interpreter's last flush at exit, would raise again (and make the exit status 120)."""
    if stream is not sys.stdout:
        return
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _live_view(stream: TextIO) -> EventSink | None:
    try:
        from hyperfleet.display.live import LiveView, ViewConsole
    except ImportError:
        return None
    return LiveView(ViewConsole(file=stream))  # type: ignore[no-any-return]


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    # Optuna's INFO lines ("A new study created ...") would break the live view; the run log
    # says the same things.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _stop_on_signals(controller: Controller, grace: float) -> Iterator[None]:
    """First Ctrl+C: finish running trials. Second: terminate them. SIGTERM: the first, then
    the second after ``grace`` seconds (what SLURM and cloud preemption expect)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        controller.request_stop(hard=controller.stop_level >= 1)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        controller.request_stop(hard=controller.stop_level >= 1, grace=grace)

    previous = signal.signal(signal.SIGINT, on_sigint), signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
