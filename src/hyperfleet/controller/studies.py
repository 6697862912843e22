"""The run's studies: each one's plan, its budget (trials and time), what its views show, and
its resumption from what an earlier run left in storage.

:class:`StudyBook` answers the questions the loop asks of a study (may it start another trial?
is it done for good?) and keeps its counts for the views without reading every trial again.
"""

from __future__ import annotations

import functools
import time

import optuna
from optuna.study import MaxTrialsCallback, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.controller import ahead, checkpoints
from hyperfleet.controller import bookkeeping as books
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.slot_table import SlotTable
from hyperfleet.controller.study_run import StudyPlan, StudyRun, opened
from hyperfleet.display.format import duration
from hyperfleet.display.runstate import StudyView
from hyperfleet.display.snapshot import last_update
from hyperfleet.sampling.auto_sampler import AutoSampler
from hyperfleet.store import schema
from hyperfleet.store.storage import is_private_journal


class StudyBook:
    """The run's studies, by name, in the order they were given."""

    def __init__(self, plans: list[StudyPlan], ctx: RunContext, slots: SlotTable) -> None:
        self.runs = {plan.name: StudyRun(plan, _study_view(plan)) for plan in plans}
        self.opened = False  # every study was opened (the storage too)
        self._ctx = ctx
        self._slots = slots
        # When the controller before this one last wrote status.json: a trial it left running
        # was running until about then (read before this run writes its own).
        self._last_alive: float | None = None
        ctx.state.studies = [run.view for run in self.runs.values()]

    @property
    def studies(self) -> dict[str, optuna.Study]:
        """Every opened study, by name."""
        return {name: run.study for name, run in self.runs.items() if run.study is not None}

    # ----- before the storage opens --------------------------------------------------------

    def read_stored(self) -> None:
        self._last_alive = last_update(self._ctx.run_dir.path)
        for run in self.runs.values():
            run.stored = run.plan.stored_trials()
            run.space = ahead.space_of(run.stored or [])
            run.time_before = run.plan.stored_time_used() if run.stored is not None else 0.0

    def budgets_already_reached(self) -> bool:
        """True when every study has all its trials already (and none left running): the run
        says so in one line per study instead of starting workers for nothing."""
        reached = []
        for run in self.runs.values():
            line = self._reached(run)
            if line is None:
                return False
            reached.append(line)
        for line in reached:
            self._ctx.announce(line)
        return True

    def _reached(self, run: StudyRun) -> str | None:
        """Why the study has nothing left to run, or None."""
        trials = run.stored
        if trials is None:
            return None
        label = self.label(run)
        timeout = run.plan.timeout
        if timeout is not None and run.time_before >= timeout:
            return (
                f"{label} already used {duration(run.time_before)} of its "
                f"{duration(timeout)}: nothing to run; raise its timeout to run more"
            )
        if run.plan.n_trials is None:
            return None
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            return None  # leftovers to mark, or repeats and experiments still to run
        if books.repeats_due(trials, self._ctx.settings.retry):
            return None  # failed trials (a named experiment) the retry policy repeats
        used = schema.budget_used(trials)
        if used < run.plan.n_trials:
            return None
        return (
            f"{label} already has {used} of its {run.plan.n_trials} trials: nothing to "
            "run; raise n_trials (--n-trials) to run more"
        )

    def first_studies(self) -> list[StudyRun]:
        """The studies that start first: those with work left (in a sequential run, those of
        the first stage with work left)."""
        runs = [run for run in self.runs.values() if self._stored_work_left(run)]
        runs = runs or list(self.runs.values())
        if self._ctx.sequential:
            stage = min(run.plan.stage for run in runs)
            runs = [run for run in runs if run.plan.stage == stage]
        return runs

    def _stored_work_left(self, run: StudyRun) -> bool:
        """Whether the study has work left, judged from the storage before it is opened."""
        if run.time_left(time.monotonic()) == 0.0:
            return False
        trials, n_trials = run.stored, run.plan.n_trials
        if trials is None or n_trials is None:
            return True
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            return True  # leftovers to repeat, or experiments to run
        return schema.budget_used(trials) < n_trials

    def another_may_start(self, failed: StudyRun) -> bool:
        """Whether a study that starts first, other than ``failed``, may still load: the run
        then goes on without ``failed``; otherwise nothing can run and nothing is written."""
        return any(run is not failed and not run.load_failure for run in self.first_studies())

    # ----- opening: resuming what an earlier run left ---------------------------------------

    def open_all(self, announce: bool = True) -> None:
        for run in self.runs.values():
            run.study = run.plan.open_study()
            run.study._stop_flag = False  # as study.optimize starts: a stop is per call
            self._resume(run)
            if announce:
                self._announce_budget(run)
        self.opened = True

    def _resume(self, run: StudyRun) -> None:
        """Fail what a dead controller left running, repeat what the policy allows."""
        study = opened(run)
        private = is_private_journal(study._storage, self._ctx.run_dir.journal)
        self._fail_leftovers(run, private)
        trials = study.get_trials(deepcopy=False)
        retried = schema.retried_numbers(trials)
        for trial in trials:
            if trial.state == TrialState.FAIL and trial.number not in retried:
                kind = str(trial.system_attrs.get(schema.KIND_ATTR, "error"))
                repeated = books.maybe_retry(study, trial, kind, self._ctx.settings.retry)
                if repeated:
                    retried.add(trial.number)
                self._say_repeat(run, trial, kind, repeated)
        trials = study.get_trials(deepcopy=False)
        run.finished = schema.budget_used(trials)
        run.time_before = schema.time_used_of(study)
        in_memory = isinstance(study._storage, optuna.storages.InMemoryStorage)
        if isinstance(study.sampler, AutoSampler):  # says once which sampler it chose, and why
            study.sampler.on_choice = functools.partial(self._say_sampler, run)
        run.shared = not (private or in_memory)  # others could be writing the same study
        run.view.directions = tuple(d.name for d in study.directions)
        self.refresh_view(run, trials)
        self.sweep_checkpoints(run)

    def _fail_leftovers(self, run: StudyRun, private: bool) -> None:
        """Mark the trials a dead controller left running interrupted, with their files."""
        study, folder = opened(run), run.plan.folder
        leftovers = books.fail_interrupted_leftovers(
            study,
            self._ctx.run_dir.marks,
            private,
            started=lambda number: folder.existing_trial_dir(number).is_dir(),
            last_seen=lambda number: books.last_sign_of_life(
                folder.existing_trial_dir(number), self._last_alive
            ),
        )
        for trial in leftovers:
            label = self.trial_label(run, trial.number)
            self._ctx.announce(f"{label} was left running: marked interrupted")
        trials = study.get_trials(deepcopy=False)
        for trial in leftovers:  # the dead controller never wrote how these trials ended
            record = books.record_from_frozen(study.study_name, trials[trial.number])
            books.write_trial_files(folder.existing_trial_dir(trial.number), record)

    def _say_sampler(self, run: StudyRun, line: str) -> None:
        self._ctx.announce(f"{self.label(run)}: {line}")

    def _say_repeat(self, run: StudyRun, trial: FrozenTrial, kind: str, repeated: bool) -> None:
        """Whether a failed trial of an earlier run runs again; a named experiment that does
        not is said too, with the retry rule that would repeat it."""
        label = self.trial_label(run, trial.number)
        experiment = trial.user_attrs.get(schema.EXPERIMENT_ATTR)
        if experiment is None:
            if repeated:
                self._ctx.announce(f"{label} ({kind}) will be repeated")
            return
        failed = f"experiment {experiment} ({label}) failed ({kind})"
        if repeated:
            self._ctx.announce(f"{failed} and will be repeated")
            return
        self._ctx.announce(
            f"{failed} and is not repeated: the retry policy allows no more {kind} retries; "
            f'to repeat it, raise them (retry = "{kind}=1" in [campaign], or --retry {kind}=1)',
        )

    def _announce_budget(self, run: StudyRun) -> None:
        """What a resumed run (or one sharing its storage) has left of the study's budgets,
        trials and time, in one line."""
        n_trials, timeout = run.plan.n_trials, run.plan.timeout
        resumed = run.finished or (timeout is not None and run.time_before)
        if (n_trials is None and timeout is None) or not (resumed or run.shared):
            return
        used, left, done = [], [], False
        if n_trials is not None:
            used.append(f"{run.finished} of {n_trials} trials")
            left.append(f"{max(0, n_trials - run.finished)} trials")
            done = run.finished >= n_trials
        if timeout is not None:
            used.append(f"{duration(run.time_before)} of {duration(timeout)}")
            left.append(duration(timeout - run.time_before))
            done = done or run.time_before >= timeout
        rest = "nothing left to run" if done else f"this run adds up to {' and '.join(left)}"
        shared = "; trials of other runs on the same storage count too" if run.shared else ""
        self._ctx.announce(f"{self.label(run)}: {' and '.join(used)} used already, {rest}{shared}")

    def stopped_by_study(self) -> list[StudyRun]:
        """The studies whose ``study.stop()`` was called (see controller.callbacks)."""
        return [run for run in self.runs.values() if run.study is not None and run.study._stop_flag]

    def label(self, run: StudyRun) -> str:
        return f"study {run.plan.name}" if len(self.runs) > 1 else "the study"

    def trial_label(self, run: StudyRun, number: int) -> str:
        return f"trial {number}" + (f" of {run.plan.name}" if len(self.runs) > 1 else "")

    # ----- budgets -------------------------------------------------------------------------

    def has_work(self, run: StudyRun) -> bool:
        """May the study start another trial now (stop, deadlines, budget)?"""
        stops = self._ctx.stops
        if stops.level or run.study is None or run.load_failure or run.study._stop_flag:
            return False
        now = time.monotonic()
        if stops.timed_out(now) or run.time_left(now) == 0.0:
            return False
        if self._slots.all_dead(run.plan.slots, self._ctx.clustered):
            return False
        n_trials = run.plan.n_trials
        if n_trials is not None and self.reserved(run) >= n_trials:
            return False
        return not self._trial_limit_reached(run)

    def _trial_limit_reached(self, run: StudyRun) -> bool:
        """Whether a ``MaxTrialsCallback`` among the study's callbacks would stop it once the
        trials running now end: no more start, so the study ends with exactly the trials the
        callback allows (Optuna's own ``n_jobs`` threads start more, and pass it). A running
        trial that ends in a state the callback does not count leaves room for another."""
        limits = [cb for cb in run.plan.callbacks if isinstance(cb, MaxTrialsCallback)]
        if not limits or run.study is None:
            return False
        trials = run.study.get_trials(deepcopy=False)
        in_flight = self.reserved(run) - run.finished
        for limit in limits:
            states = limit._states  # no public accessor
            ended = sum(
                1 for t in trials if t.state.is_finished() and (states is None or t.state in states)
            )
            if ended + in_flight >= limit._n_trials:
                return True
        return False

    def reserved(self, run: StudyRun) -> int:
        """The study's trials that count against its budget: finished, running, and sent to a
        slot whose result before it is still to be recorded (see controller.prepared)."""
        sent = sum(1 for launch in self._slots.sent_next.values() if launch.run is run)
        return run.finished + self._slots.book.running(run.plan.name) + sent

    def budget_spent(self, run: StudyRun) -> bool:
        """Whether the study is done for good: its trials, its time or its objective."""
        if run.study is None:
            return False
        if run.load_failure or run.time_left(time.monotonic()) == 0.0:
            return True
        n_trials = run.plan.n_trials
        return n_trials is not None and run.finished >= n_trials

    def recount_shared_budgets(self) -> None:
        """On a storage other controllers share, the study's finished trials are counted from
        storage before slots are handed out, so that several runs together keep to
        ``n_trials``. Trials the others are running are not counted: a RUNNING trial may be a
        dead controller's leftover that nobody resumes, and counting it would hold the budget
        back for ever; so the runs together can pass the budget by the trials the others have
        running at the end.

        The count is taken once per round of hand-outs (one kept by this run alone would
        miss the others' trials), looking only at the trials that are new or were unfinished
        at the last count (:class:`~hyperfleet.store.schema.BudgetCount`). The run
        directory's own journal, the default, has no other writer and is not recounted."""
        for run in self.runs.values():
            if not run.shared or run.study is None or run.plan.n_trials is None:
                continue
            run.finished = run.budget_count.used(run.study.get_trials(deepcopy=False))

    # ----- checkpoints ---------------------------------------------------------------------

    def sweep_checkpoints(self, run: StudyRun) -> None:
        """Settle every ended chain's checkpoint folder at once (see controller.checkpoints).
        A run whose objective never asked for a folder pays one look at the disk."""
        keep = self._ctx.settings.keep_checkpoints
        if keep == "all" or not run.plan.folder.checkpoints_dir.is_dir():
            return
        study = opened(run)
        trials = study.get_trials(deepcopy=False)
        best = checkpoints.best_numbers(study, trials)
        checkpoints.sweep(run.plan.folder.checkpoints_dir, trials, keep, best)
        if len(best) == 1:
            run.best_checkpoint = run.plan.folder.checkpoint_dir(
                schema.first_attempt(trials[next(iter(best))])
            )

    # ----- what the views show -------------------------------------------------------------

    def refresh_view(self, run: StudyRun, trials: list[FrozenTrial] | None = None) -> None:
        study, view = opened(run), run.view
        if trials is None:
            trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        view.complete = states.count(TrialState.COMPLETE)
        view.pruned = states.count(TrialState.PRUNED)
        failures = [t for t in trials if t.state == TrialState.FAIL]
        view.interrupted = sum(schema.is_interrupted(t) for t in failures)
        view.failed = len(failures) - view.interrupted
        view.running = self._slots.book.running(run.plan.name)
        view.finished = run.finished
        best = _best_trial(study, trials)
        if best is not None:
            view.best_number, view.best_values = best.number, list(best.values)
            view.best_params = dict(best.params)

    def count_trial_end(self, run: StudyRun, trial: FrozenTrial) -> None:
        """The study's counts and best trial after one more ended, without reading every
        trial again (that would cost more per trial the larger the study grows)."""
        view = run.view
        if trial.state == TrialState.COMPLETE:
            view.complete += 1
        elif trial.state == TrialState.PRUNED:
            view.pruned += 1
        elif trial.state == TrialState.FAIL and schema.is_interrupted(trial):
            view.interrupted += 1
        elif trial.state == TrialState.FAIL:
            view.failed += 1
        view.running = self._slots.book.running(run.plan.name)
        view.finished = run.finished
        if trial.state != TrialState.COMPLETE or trial.values is None or len(trial.values) != 1:
            return
        if _CONSTRAINTS_KEY in trial.system_attrs:  # feasibility decides: let Optuna judge
            self.refresh_view(run)
        elif _improves(trial.values[0], view.best_values, opened(run).direction):
            view.best_number, view.best_values = trial.number, list(trial.values)
            view.best_params = dict(trial.params)


def _study_view(plan: StudyPlan) -> StudyView:
    return StudyView(
        plan.name,
        (),
        n_trials=plan.n_trials,
        stage=plan.stage,
        stage_name=plan.stage_name,
        timeout=plan.timeout,
    )


def _best_trial(study: optuna.Study, trials: list[FrozenTrial]) -> FrozenTrial | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    if len(study.directions) > 1:
        return None
    return study.best_trial


_CONSTRAINTS_KEY = "constraints"  # where Optuna keeps a trial's constraint values


def _improves(value: float, best: list[float] | None, direction: StudyDirection) -> bool:
    if best is None:
        return True
    return value < best[0] if direction == StudyDirection.MINIMIZE else value > best[0]
