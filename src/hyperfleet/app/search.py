"""One search from start to end, shared by ``hyperfleet.optimize``, ``hyperfleet run`` and
``hyperfleet.run_campaign``.

Each entry point only translates and checks its own inputs (keywords, flags, a campaign file)
into a :class:`RunSetup`, and a single search also into a :class:`SingleStudy` on its
:class:`FirstSlots`; from there one path plans, runs, refits and reports them all.

Order matters: everything that can be checked without running the objective is checked first,
then the run directory is locked, workers start, and only when a worker has loaded the
objective is the study opened, so bad input writes nothing to storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
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
from hyperfleet.controller.loop import Controller, Outcome
from hyperfleet.controller.study_run import StudyPlan
from hyperfleet.display.events import (
    Broadcast,
    Event,
    EventSink,
    Notice,
    PlainLog,
    RunEnded,
    TrialEnded,
    TrialStarted,
)
from hyperfleet.display.screen import screen_view
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


@dataclass(frozen=True)
class RunSetup:
    """How every entry point's run goes, once it translated and checked its own inputs: the
    run's settings, its folder and name, how it shows itself, whether it writes its reports at
    the end, and (many machines) the cluster its agents join."""

    settings: RunSettings
    run_dir: RunDir
    run_name: str
    display: Display = Display()
    report: bool = True
    cluster: ClusterSettings | None = None
    inventory_note: str = ""  # how this machine's GPUs were found, and which were left out


@dataclass(frozen=True)
class FirstSlots:
    """A single search's slots, planned before anything is written: this machine's first slots
    (none when agents bring them), how its GPUs were found, how auto packing may grow them, and
    how a node that joins is cut (many machines)."""

    slots: list[Slot]
    note: str = ""
    packing: PackingSettings | None = None
    node_options: PoolOptions | None = None


def plan_first_slots(
    options: PoolOptions, inventory: Inventory | None, cluster: ClusterSettings | None = None
) -> FirstSlots:
    """The pool's first slots on this machine (``inventory``, detected when None); with a
    ``cluster``, none: each node that joins is cut into slots with ``options``."""
    if cluster is not None:
        return FirstSlots([], node_options=options)
    inventory = inventory if inventory is not None else detect_inventory()
    slots = plan_slots(inventory, options)
    return FirstSlots(slots, inventory.note, auto_packing(inventory, options, slots))


@dataclass(frozen=True)
class SingleStudy:
    """The study of a single search, however its entry point opens it."""

    name: str
    open_study: Callable[[], optuna.Study]
    spec: ObjectiveSpec
    refit: RefitPlan | None = None
    stored_trials: Callable[[], list[FrozenTrial] | None] = lambda: None


def run_single_study(study: SingleStudy, first_slots: FirstSlots, setup: RunSetup) -> Outcome:
    """One study on every slot: what ``hyperfleet.optimize`` and ``hyperfleet run FILE:FN``
    run, each with its own inputs translated into these three."""
    settings = dataclasses.replace(setup.settings, packing=first_slots.packing)
    plan = StudyPlan(
        name=study.name,
        spec=study.spec,
        open_study=study.open_study,
        folder=setup.run_dir,
        slots=tuple(slot.name for slot in first_slots.slots),
        n_trials=settings.n_trials,
        stored_trials=study.stored_trials,
        callbacks=settings.callbacks,
    )
    options = first_slots.node_options
    search = Search(
        [plan],
        single_pool(first_slots.slots),
        {study.name: study.refit} if study.refit is not None else {},
        node_planner=single_search_planner(study.name, options) if options is not None else None,
    )
    return run_search(
        search, dataclasses.replace(setup, settings=settings, inventory_note=first_slots.note)
    )


def run_search(search: Search, setup: RunSetup) -> Outcome:
    """Lock the run folder, run the search with the sinks of its events, and unlock it; bad
    input (an objective that cannot load) leaves no new run folder behind."""
    run_dir = setup.run_dir
    owner = search.owner(run_dir, setup.run_name)
    run_dir.check_owner(owner)
    fresh = not run_dir.exists()
    run_dir.create(owner)
    run_dir.lock()
    run_log = open(run_dir.run_log, "a")  # noqa: SIM115 (closed in finally)
    controller: Controller | None = None
    log = PlainLog(run_log)
    screen = screen_view(setup.display.mode, setup.display.stream, log)
    files = FileWriter()
    try:
        campaign = owner.kind == "campaign"
        sinks: list[EventSink] = [
            RunDirGuard(run_dir),  # first: nothing is written into a folder made again
            log,
            *_run_folder_sinks(search, run_dir, campaign, files.drain, lambda: controller),
            screen,
        ]
        controller = Controller(
            search.plans,
            search.pool,
            setup.settings,
            run_dir,
            Broadcast(sinks),
            setup.run_name,
            search.sequential,
            files=files,
            cluster=setup.cluster,
            node_planner=search.node_planner,
        )
        try:
            return _run_to_the_end(search, controller, setup, campaign)
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


def _run_folder_sinks(
    search: Search,
    run_dir: RunDir,
    campaign: bool,
    files_written: Callable[[], None],
    controller: Callable[[], Controller | None],
) -> list[EventSink]:
    """status.json, each study's best/ and the run's summary.md; they read the studies once
    the controller opened them."""

    def get_study() -> optuna.Study | None:
        opened = controller()
        return opened.study if opened is not None else None

    def studies() -> dict[str, optuna.Study]:
        opened = controller()
        return opened.studies if opened is not None else {}

    def study_named(name: str) -> Callable[[], optuna.Study | None]:
        return lambda: studies().get(name)

    return [
        StatusSnapshot(run_dir.path, get_study),
        *[
            BestFolder(plan.folder, study_named(plan.name), plan.name, files_written)
            for plan in search.plans
        ],
        RunSummary(run_dir, lambda: list(studies().values()), campaign=campaign),
    ]


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
    search: Search, controller: Controller, setup: RunSetup, campaign: bool = False
) -> Outcome:
    """The search, then each study's refit and report, and a campaign's own report."""
    # The note's first line says how GPUs were found; each next one, a GPU left out and why.
    found, *problems = setup.inventory_note.splitlines() or [""]
    if found.startswith("no GPU"):
        controller.announce(found)
    for problem in problems:
        controller.announce(problem)
    for note in search.pool.notes:
        controller.announce(note)
    with _quiet_optuna(), _stop_on_signals(controller, setup.settings.stop_grace):
        outcome = controller.run()
    searched = outcome.status  # each refit follows the search, whatever another refit did
    for plan in search.plans:
        study = controller.studies.get(plan.name)
        refit = search.refits.get(plan.name)
        if study is not None and refit is not None:
            # With agents, the refit runs on the controller's machine, unpinned.
            slot = next((s for s in search.pool.slots if s.name in plan.slots), current_slot())
            outcome = _refit(refit, outcome, searched, study, plan, slot, controller)
    if setup.report:
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


class RunDirGuard:
    """Stops the run at its next event once the run directory was deleted or moved: writing on
    would make a new folder (or a new, empty journal) at its path. A look costs a system call:
    trials and notices look now and then, the run's start, ticks and end every time."""

    def __init__(self, run_dir: RunDir) -> None:
        self._run_dir = run_dir

    def handle(self, event: Event) -> None:
        if isinstance(event, (TrialStarted, TrialEnded, Notice)):
            self._run_dir.check_now_and_then()
        else:
            self._run_dir.check_still_there()


def _run_folder_lost(
    exc: OSError | RunDirGone, run_dir: RunDir, controller: Controller, screen: EventSink
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
    screen.handle(RunEnded(controller.state))  # it ends as after any run; the folder's cannot
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
