"""``hyperfleet.optimize``: the drop-in replacement for ``study.optimize``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.app.search import (
    Display,
    RunSetup,
    SingleStudy,
    plan_first_slots,
    run_single_study,
)
from hyperfleet.cluster.channel import parse_address
from hyperfleet.cluster.hub import ClusterSettings
from hyperfleet.config import RetryPolicy, RunSettings, parse_duration, parse_memory
from hyperfleet.controller.callbacks import check_callbacks
from hyperfleet.controller.loop import Outcome
from hyperfleet.errors import ConfigError, ObjectiveError
from hyperfleet.objective.refit import plan_from_callable
from hyperfleet.resources.inventory import Inventory
from hyperfleet.resources.slots import PoolOptions
from hyperfleet.sampling.samplers import check_study_sampler
from hyperfleet.store.rundir import RunDir, check_folder_name
from hyperfleet.store.storage import controller_study
from hyperfleet.workers.main import WORKER_PID_ENV
from hyperfleet.workers.packaging import spec_from_callable


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    n_trials: int | None = None,
    timeout: float | str | None = None,
    *,
    gpus: Sequence[int | str] | None = None,
    trials_per_gpu: int | str = "auto",
    gpu_memory: str | int | None = None,
    gpus_per_trial: int = 1,
    cpu_slots: int | None = None,
    threads_per_slot: int | None = None,
    run_dir: str | Path | None = None,
    trial_timeout: float | str | None = None,
    retry: RetryPolicy | str | None = None,
    max_trials_per_worker: int | None = None,
    stop_grace: float | str = 30.0,
    kill_grace: float | str = 5.0,
    keep_checkpoints: str = "best",
    display: str = "auto",
    report: bool = True,
    objective_kwargs: dict[str, Any] | None = None,
    inventory: Inventory | None = None,
    refit: Callable[[dict[str, Any]], Any] | None = None,
    force_refit: bool = False,
    listen: str | None = None,
    token_file: str | Path | None = None,
    heartbeat: float | str = 2.0,
    node_timeout: float | str = 10.0,
    ray: str | None = None,
    slurm: bool = False,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    n_jobs: int | None = None,
    catch: Iterable[type[Exception]] | type[Exception] = (),
    gc_after_trial: bool = False,
    show_progress_bar: bool = False,
    sampling_processes: int | None = None,
) -> Outcome:
    """Run ``objective`` on every slot of this machine, like ``study.optimize(objective, ...)``.

    ``n_trials`` counts the study's finished trials, every run's: running again adds up to it.
    ``timeout`` bounds this call. ``objective_kwargs``: ``objective`` is a factory, called once
    per worker with them. ``inventory`` replaces the detected GPUs and cores. ``trials_per_gpu``
    "auto" grows each GPU's workers while they fit; ``gpu_memory`` ("10GiB") packs by what a
    trial takes. After SIGTERM running trials get ``stop_grace``, then ``kill_grace`` between
    SIGTERM and SIGKILL. ``keep_checkpoints``: "best", "all" or "none" (see
    :func:`hyperfleet.checkpoint_dir`). ``report=False``: no ``run_dir/report/``.
    ``refit(params)`` runs once with the best parameters (:mod:`hyperfleet.objective.refit`).
    ``listen="HOST:PORT"`` runs the trials on the nodes whose agents connect there, cut into
    slots by the pool keywords, with ``token_file``, ``heartbeat`` and ``node_timeout``;
    ``ray="auto"`` (or an address) or ``slurm=True`` start the agents. ``callbacks`` are called
    with ``(study, frozen_trial)`` in the controller as each trial ends; ``study.stop()`` works,
    and a callback's exception is raised here once nothing runs. ``n_jobs`` is taken as
    ``cpu_slots`` when that is not given; ``catch``, ``gc_after_trial`` and
    ``show_progress_bar`` are checked and accepted (every trial that raises fails alone; workers
    collect after every trial; the live view shows progress). ``sampling_processes``: for TPE,
    processes that sample ahead beside the controller (default: none).
    """
    refuse_inside_a_worker("optimize")
    return _Optimize(**locals()).run()  # every argument, by name


@dataclass(frozen=True)
class _Optimize:
    """The arguments of :func:`optimize`, translated step by step into the builder's inputs
    (see :mod:`hyperfleet.app.search`), in the order that checks the cheap ones first."""

    study: optuna.Study
    objective: Callable[[optuna.Trial], Any]
    n_trials: int | None
    timeout: float | str | None
    gpus: Sequence[int | str] | None
    trials_per_gpu: int | str
    gpu_memory: str | int | None
    gpus_per_trial: int
    cpu_slots: int | None
    threads_per_slot: int | None
    run_dir: str | Path | None
    trial_timeout: float | str | None
    retry: RetryPolicy | str | None
    max_trials_per_worker: int | None
    stop_grace: float | str
    kill_grace: float | str
    keep_checkpoints: str
    display: str
    report: bool
    objective_kwargs: dict[str, Any] | None
    inventory: Inventory | None
    refit: Callable[[dict[str, Any]], Any] | None
    force_refit: bool
    listen: str | None
    token_file: str | Path | None
    heartbeat: float | str
    node_timeout: float | str
    ray: str | None
    slurm: bool
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] | None
    n_jobs: int | None
    catch: Iterable[type[Exception]] | type[Exception]
    gc_after_trial: bool
    show_progress_bar: bool
    sampling_processes: int | None

    def run(self) -> Outcome:
        study = self.study
        check_study_sampler(study)
        check_optimize_options(self.catch, self.gc_after_trial, self.show_progress_bar)
        settings = self._settings()
        options = self._pool_options()
        cluster = cluster_settings(
            self.listen, self.token_file, self.heartbeat, self.node_timeout, self.ray, self.slurm
        )
        first_slots = plan_first_slots(options, self.inventory, cluster)
        spec = spec_from_callable(self.objective, self.objective_kwargs)
        refit = self.refit
        refit_plan = plan_from_callable(refit, self.force_refit) if refit is not None else None
        folder = RunDir(self.run_dir if self.run_dir is not None else default_run_dir(study))
        single = SingleStudy(
            study.study_name,
            lambda: controller_study(study),
            spec,
            refit_plan,
            stored_trials=lambda: study.get_trials(deepcopy=False),
        )
        display = Display(self.display)
        setup = RunSetup(settings, folder, study.study_name, display, self.report, cluster)
        outcome = run_single_study(single, first_slots, setup)
        if outcome.error is not None:  # a callback raised: as study.optimize, raise it
            raise outcome.error
        return outcome

    def _settings(self) -> RunSettings:
        retry = self.retry
        return RunSettings(
            n_trials=self.n_trials,
            timeout=parse_duration(self.timeout, "timeout"),
            trial_timeout=parse_duration(self.trial_timeout, "trial_timeout"),
            retry=RetryPolicy.parse(retry) if isinstance(retry, str) else retry or RetryPolicy(),
            max_trials_per_worker=self.max_trials_per_worker,
            stop_grace=parse_duration(self.stop_grace, "stop_grace") or 0.0,
            kill_grace=parse_duration(self.kill_grace, "kill_grace") or 0.0,
            keep_checkpoints=self.keep_checkpoints,
            callbacks=check_callbacks(self.callbacks, "hyperfleet.optimize"),
            sampling_processes=self.sampling_processes,
        )

    def _cpu_slots(self) -> int | None:
        """``cpu_slots``, else Optuna's ``n_jobs`` (-1: every core, the default)."""
        if self.cpu_slots is not None or self.n_jobs in (None, -1):
            return self.cpu_slots
        return self.n_jobs

    def _pool_options(self) -> PoolOptions:
        return PoolOptions(
            gpus=[str(g) for g in self.gpus] if self.gpus is not None else None,
            trials_per_gpu=self.trials_per_gpu,
            gpus_per_trial=self.gpus_per_trial,
            cpu_slots=self._cpu_slots(),
            threads_per_slot=self.threads_per_slot,
            gpu_memory_mib=parse_memory(self.gpu_memory),
        )


def check_optimize_options(catch: object, gc_after_trial: object, progress_bar: object) -> None:
    """``study.optimize``'s options that hyperfleet maps to its own behaviour, checked as
    Optuna checks them."""
    types = catch if isinstance(catch, tuple) else (catch,)
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise ConfigError(
            f"catch={catch!r} must be an exception class or a tuple of them, as in "
            "study.optimize (hyperfleet fails a trial that raises alone, whatever it raises)"
        )
    for name, value in (("gc_after_trial", gc_after_trial), ("show_progress_bar", progress_bar)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be True or False, as in study.optimize")


def cluster_settings(
    listen: str | None,
    token_file: str | Path | None,
    heartbeat: float | str,
    node_timeout: float | str,
    ray: str | None = None,
    slurm: bool = False,
) -> ClusterSettings | None:
    """The settings of a run whose slots come from agents; None on a single machine."""
    if ray is not None and slurm:
        raise ConfigError("give one engine: ray or slurm, not both.")
    if listen is None and ray is None and not slurm:
        if token_file is not None:
            raise ConfigError("a token file is for agents: give listen=HOST:PORT with it.")
        return None
    settings = ClusterSettings(
        listen=listen or "",
        ray=ray,
        slurm=slurm,
        token_file=Path(token_file) if token_file is not None else None,
        heartbeat=parse_duration(heartbeat, "heartbeat") or 2.0,
        node_timeout=parse_duration(node_timeout, "node timeout") or 10.0,
    )
    if listen:
        parse_address(listen)
    if settings.node_timeout <= settings.heartbeat:
        raise ConfigError(
            f"node timeout {settings.node_timeout:g}s must be longer than the heartbeat "
            f"{settings.heartbeat:g}s (five heartbeats is a good margin)."
        )
    if ray is not None:  # last: it may wait for the head to answer
        from hyperfleet.cluster.ray_launcher import check_address

        check_address(ray)
    return settings


def refuse_inside_a_worker(function: str) -> None:
    """A worker imports the user's script to find the objective (as multiprocessing's spawn
    does); a script that starts the search at its top level would start it again there."""
    if os.environ.get(WORKER_PID_ENV) != str(os.getpid()):
        return
    caller = sys._getframe(2)  # the line that called hyperfleet.optimize or run_campaign
    where = f"{Path(caller.f_code.co_filename).name}, line {caller.f_lineno},"
    raise ObjectiveError(
        f"{where} calls hyperfleet.{function} when the script is imported (each worker imports "
        f'it to find the objective); put the call under `if __name__ == "__main__":`.'
    )


def default_run_dir(study: optuna.Study) -> Path:
    """``runs/<study name>``; an in-memory study cannot resume, so it gets a fresh folder."""
    fix = "rename the study, or pass run_dir=... to choose its folder."
    check_folder_name(study.study_name, "study name", fix)
    if isinstance(study._storage, optuna.storages.InMemoryStorage):
        return Path("runs") / f"{study.study_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / study.study_name


def run_campaign(
    path: str | Path | Mapping[str, Any],
    *,
    sequential: bool | None = None,
    run_dir: str | Path | None = None,
    stop_grace: float | str = 30.0,
    kill_grace: float | str = 5.0,
    keep_checkpoints: str = "best",
    display: str = "auto",
    report: bool = True,
    force_refit: bool = False,
    retry: RetryPolicy | str | None = None,
    inventory: Inventory | None = None,
    listen: str | None = None,
    token_file: str | Path | None = None,
    heartbeat: float | str = 2.0,
    node_timeout: float | str = 10.0,
    ray: str | None = None,
    slurm: bool = False,
) -> Outcome:
    """Run every study of a campaign file in one pool, like ``hyperfleet run campaign.toml``.

    ``path`` may also be the campaign as Python values: a dict of the file's tables whose
    studies' ``objective`` and ``callbacks`` may be functions, as :func:`optimize` takes them
    (paths in it are relative to the current folder). ``sequential`` overrides the file's
    ``sequential``; ``run_dir`` its ``run_dir`` (default ``runs/<campaign name>``); ``retry``
    its ``retry`` (``"crash=1,error=1"``). The other keywords are those of :func:`optimize`;
    with ``listen``, ``ray`` or ``slurm``, each node that joins is cut into slots as the file's
    ``[pool]`` says.
    """
    from hyperfleet.app.campaign_search import (
        campaign_settings,
        run_campaign_search,
    )
    from hyperfleet.campaign import load_campaign

    refuse_inside_a_worker("run_campaign")
    campaign = load_campaign(path)
    settings = campaign_settings(
        campaign,
        stop_grace=parse_duration(stop_grace, "stop_grace") or 0.0,
        kill_grace=parse_duration(kill_grace, "kill_grace") or 0.0,
        keep_checkpoints=keep_checkpoints,
        retry=RetryPolicy.parse(retry) if isinstance(retry, str) else retry,
    )
    chosen = run_dir or campaign.settings.run_dir or Path("runs") / campaign.settings.name
    folder = RunDir(chosen)
    folder.check_writable()
    cluster = cluster_settings(
        listen or campaign.settings.listen,
        token_file,
        heartbeat,
        node_timeout,
        ray or campaign.settings.ray,
        slurm or campaign.settings.slurm,
    )
    setup = RunSetup(settings, folder, campaign.settings.name, Display(display), report, cluster)
    return run_campaign_search(campaign, setup, inventory, sequential, force_refit)
