"""``hyperfleet.optimize``: the drop-in replacement for ``study.optimize``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.cluster.channel import parse_address
from hyperfleet.cluster.hub import ClusterSettings
from hyperfleet.config import RetryPolicy, RunSettings, parse_duration, parse_memory
from hyperfleet.controller.callbacks import check_callbacks
from hyperfleet.controller.loop import Outcome
from hyperfleet.errors import ConfigError, ObjectiveError
from hyperfleet.launch import Display, prepare_slots, run_search, single_search
from hyperfleet.refit import plan_from_callable
from hyperfleet.resources.inventory import Inventory, detect_inventory
from hyperfleet.resources.slots import PoolOptions
from hyperfleet.rundir import RunDir, check_folder_name
from hyperfleet.samplers import check_study_sampler
from hyperfleet.storage import controller_study
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
    catch: Iterable[type[Exception]] | type[Exception] = (),
    gc_after_trial: bool = False,
    show_progress_bar: bool = False,
    n_jobs: int | None = None,
    sampling_processes: int | None = None,
) -> Outcome:
    """Run ``objective`` on every slot of this machine, like ``study.optimize(objective, ...)``.

    ``n_trials`` counts the study's finished trials, so running the same code again on a
    persistent storage adds up to the same total. ``timeout`` bounds this call's wall time.
    With ``objective_kwargs``, ``objective`` is a factory called once per worker with them
    that returns the objective (load a data set there). ``inventory`` replaces the detected
    GPUs and cores (for tests and dry runs). ``trials_per_gpu="auto"`` (the default) starts one
    worker per GPU and adds more while the GPU has memory and time for them; ``gpu_memory``
    ("10GiB") says what one trial takes, to pack by it instead of by readings. After SIGTERM,
    running trials get ``stop_grace`` to finish before they are terminated; a terminated
    trial's processes get ``kill_grace`` between SIGTERM and SIGKILL. ``keep_checkpoints``
    ("best", "all" or "none") says whose checkpoint folders outlive trials that completed or
    were pruned (see :func:`hyperfleet.checkpoint_dir`). ``report=False`` skips writing
    ``run_dir/report/`` at the end. ``refit(params)`` runs once after a completed search with
    the best parameters, on the first slot, in ``run_dir/best/refit/``; it is skipped while the
    best parameters stay the same, unless ``force_refit`` (see :mod:`hyperfleet.refit`).

    ``listen="HOST:PORT"`` runs the trials on the nodes whose agents connect there (``hyperfleet
    agent --connect HOST:PORT``), each cut into slots with the pool keywords above, instead of
    on this machine; ``token_file`` holds the token agents must present (default: one written
    in ``run_dir``). A node silent for ``node_timeout`` seconds is lost and its trials run
    again elsewhere; both sides send a heartbeat every ``heartbeat`` seconds. ``ray="auto"``
    (or a Ray address) has Ray start one agent on each of its nodes, with the node's GPUs
    reserved through Ray; the controller then listens where Ray does, unless ``listen`` says.
    ``slurm=True``, inside an allocation, has ``srun`` start one agent per allocated node.

    ``callbacks`` are Optuna's: each is called with ``(study, frozen_trial)`` as each trial
    ends, in the controller; ``study.stop()`` there stops the search once running trials
    finish, and a callback that raises ends it with that error, raised here. ``catch``,
    ``gc_after_trial`` and ``show_progress_bar`` are accepted for ``study.optimize``'s sake:
    every failing trial fails alone (as with ``catch=(Exception,)``), workers collect garbage
    after every trial, and the live view shows the progress. ``n_jobs`` (Optuna's threads)
    is taken as ``cpu_slots`` when that is not given; -1 leaves the default, every core.

    ``sampling_processes``: with TPE and trials side by side, processes on this machine that
    sample parameters ahead for the controller (see :mod:`hyperfleet.controller.sampler_pool`);
    by default the cores no slot uses, at least one; 0 has the controller sample every trial.
    """
    refuse_inside_a_worker("optimize")
    check_study_sampler(study)
    check_optimize_options(catch, gc_after_trial, show_progress_bar)
    settings = RunSettings(
        n_trials=n_trials,
        timeout=parse_duration(timeout, "timeout"),
        trial_timeout=parse_duration(trial_timeout, "trial_timeout"),
        retry=RetryPolicy.parse(retry) if isinstance(retry, str) else retry or RetryPolicy(),
        max_trials_per_worker=max_trials_per_worker,
        stop_grace=parse_duration(stop_grace, "stop_grace") or 0.0,
        kill_grace=parse_duration(kill_grace, "kill_grace") or 0.0,
        keep_checkpoints=keep_checkpoints,
        callbacks=check_callbacks(callbacks, "hyperfleet.optimize"),
        sampling_processes=sampling_processes,
    )
    options = PoolOptions(
        gpus=[str(g) for g in gpus] if gpus is not None else None,
        trials_per_gpu=trials_per_gpu,
        gpus_per_trial=gpus_per_trial,
        cpu_slots=cpu_slots if cpu_slots is not None or n_jobs in (None, -1) else n_jobs,
        threads_per_slot=threads_per_slot,
        gpu_memory_mib=parse_memory(gpu_memory),
    )
    cluster = cluster_settings(listen, token_file, heartbeat, node_timeout, ray, slurm)
    slots, note, packing = prepare_slots(options, inventory, cluster)
    settings = replace(settings, packing=packing)
    spec = spec_from_callable(objective, objective_kwargs)
    refit_plan = plan_from_callable(refit, force_refit) if refit is not None else None
    folder = RunDir(run_dir if run_dir is not None else default_run_dir(study))
    search = single_search(
        study.study_name,
        lambda: controller_study(study),
        spec,
        slots,
        settings,
        folder,
        refit_plan,
        stored_trials=lambda: study.get_trials(deepcopy=False),
        node_options=options if cluster is not None else None,
    )
    outcome = run_search(
        search,
        settings,
        folder,
        Display(display),
        inventory_note=note,
        run_name=study.study_name,
        report=report,
        cluster=cluster,
    )
    if outcome.error is not None:  # a callback raised: as study.optimize, raise it
        raise outcome.error
    return outcome


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


def check_optimize_options(
    catch: object, gc_after_trial: object, show_progress_bar: object
) -> None:
    """``study.optimize``'s options that hyperfleet maps to its own behaviour, checked as
    Optuna checks them."""
    types = catch if isinstance(catch, tuple) else (catch,)
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise ConfigError(
            f"catch={catch!r} must be an exception class or a tuple of them, as in "
            "study.optimize (hyperfleet fails a trial that raises alone, whatever it raises)"
        )
    for name, value in (
        ("gc_after_trial", gc_after_trial),
        ("show_progress_bar", show_progress_bar),
    ):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be True or False, as in study.optimize")


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

    ``path`` may also be the campaign itself, as Python values: a dict of the file's tables
    (``{"campaign": {...}, "pool": {...}, "study": [{...}, ...]}``) whose studies' ``objective``
    (and ``callbacks``) may be functions, as :func:`optimize` takes them; so a notebook runs
    its models side by side without a file. Its paths are relative to the current folder.

    ``sequential`` overrides the file's ``sequential``; ``run_dir`` its ``run_dir`` (default
    ``runs/<campaign name>``); ``retry`` its ``retry`` (``"crash=1,error=1"``). The other
    keywords are those of :func:`optimize`; with ``listen``, ``ray`` or ``slurm``, each node
    that joins is cut into slots as the file's ``[pool]`` says.
    """
    from hyperfleet.campaign import load_campaign
    from hyperfleet.campaign_search import campaign_packing, campaign_search, campaign_settings

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
    if cluster is None and inventory is None:
        inventory = detect_inventory()
    search = campaign_search(campaign, folder, inventory, sequential, force_refit)
    packing = campaign_packing(campaign, search.pool, inventory)
    return run_search(
        search,
        replace(settings, packing=packing),
        folder,
        Display(display),
        inventory_note=inventory.note if inventory is not None else "",
        run_name=campaign.settings.name,
        report=report,
        cluster=cluster,
    )
