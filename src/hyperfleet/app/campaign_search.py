"""A campaign file turned into one search: its studies, the pool they share, their refits.

Every study lives in the same storage (by default ``RUN_DIR/optuna.journal``) under its own
name, and keeps its trial folders, ``best/`` and ``report/`` in ``RUN_DIR/studies/<name>/``.
Named experiments and grid points are enqueued once: a resumed campaign finds them in the
storage (the trial's ``experiment`` user attribute) and does not enqueue them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from hyperfleet.app.search import RunSetup, Search, run_search
from hyperfleet.campaign.folders import grid_points
from hyperfleet.campaign.spec import Campaign, Experiment, StudySpec
from hyperfleet.cluster.pools import campaign_planner, shapes_packing
from hyperfleet.config import RetryPolicy, RunSettings
from hyperfleet.controller.callbacks import load_callback
from hyperfleet.controller.loop import Outcome
from hyperfleet.controller.study_run import Callback, StudyPlan
from hyperfleet.errors import ResourceError
from hyperfleet.objective.refit import RefitPlan, plan_from_command, plan_from_target
from hyperfleet.report.campaign import CAMPAIGN_ATTR
from hyperfleet.resources.inventory import Inventory, detect_inventory
from hyperfleet.resources.packing import PackingSettings
from hyperfleet.resources.shapes import Pool, plan_pool
from hyperfleet.sampling.samplers import make_pruner, make_sampler
from hyperfleet.store.rundir import RunDir
from hyperfleet.store.schema import EXPERIMENT_ATTR, stored_time_used, stored_trials
from hyperfleet.store.storage import check_directions, existing_storage, open_storage
from hyperfleet.workers.packaging import spec_from_callable, spec_from_target
from hyperfleet.workers.protocol import ObjectiveSpec


def campaign_settings(
    campaign: Campaign,
    stop_grace: float,
    kill_grace: float,
    retry: RetryPolicy | None = None,
    keep_checkpoints: str = "best",
) -> RunSettings:
    """The run's settings from ``[campaign]``; ``retry`` (``--retry``) replaces its retry."""
    settings = campaign.settings
    return RunSettings(
        timeout=settings.timeout,
        trial_timeout=settings.trial_timeout,
        retry=retry if retry is not None else RetryPolicy.parse(settings.retry),
        max_trials_per_worker=settings.max_trials_per_worker,
        stop_grace=stop_grace,
        kill_grace=kill_grace,
        keep_checkpoints=keep_checkpoints,
    )


def campaign_search(
    campaign: Campaign,
    run_dir: RunDir,
    inventory: Inventory | None,
    sequential: bool | None = None,
    force_refit: bool = False,
) -> Search:
    """Check everything that can be checked without running an objective, and plan the run.

    ``sequential`` overrides the file's ``sequential`` when given. Without an ``inventory``
    the slots come from the nodes that join, each cut as ``[pool]`` says."""
    shapes = [(study.name, study.shape) for study in campaign.studies]
    planner = campaign_planner(campaign.pool, shapes) if inventory is None else None
    pool = (
        plan_pool(inventory, campaign.pool, [shape for _, shape in shapes])
        if inventory is not None
        else Pool(slots=(), needs={}, eligible={})
    )
    for study in campaign.studies:
        if inventory is not None:
            _check_placeable(campaign, study, pool)
    existing = existing_storage(campaign.settings.storage, run_dir)
    storage = _SharedStorage(campaign.settings.storage, run_dir, existing)
    stages = _stage_numbers(campaign.studies)
    plans = [
        _plan(campaign, study, pool, run_dir, storage.get, existing, stages[study.name])
        for study in campaign.studies
    ]
    refits = {
        study.name: plan
        for study in campaign.studies
        if (plan := _refit_plan(campaign, study, force_refit)) is not None
    }
    in_order = campaign.settings.sequential if sequential is None else sequential
    return Search(plans, pool, refits, in_order, node_planner=planner)


def run_campaign_search(
    campaign: Campaign,
    setup: RunSetup,
    inventory: Inventory | None,
    sequential: bool | None = None,
    force_refit: bool = False,
) -> Outcome:
    """Plan the campaign's search and run it: on this machine's ``inventory`` (detected when
    None), or with ``setup.cluster`` on the nodes that join, each cut as ``[pool]`` says."""
    if setup.cluster is None and inventory is None:
        inventory = detect_inventory()
    search = campaign_search(campaign, setup.run_dir, inventory, sequential, force_refit)
    packing = campaign_packing(campaign, search.pool, inventory)
    settings = dataclasses.replace(setup.settings, packing=packing)
    note = inventory.note if inventory is not None else ""
    return run_search(search, dataclasses.replace(setup, settings=settings, inventory_note=note))


def campaign_packing(
    campaign: Campaign, pool: Pool, inventory: Inventory | None
) -> PackingSettings | None:
    """How auto packing grows this machine's GPUs for the studies whose slot says ``gpus =
    "auto"`` (see :func:`~hyperfleet.cluster.pools.shapes_packing`); None on many machines,
    where each node's GPUs are packed as it joins (its planner's)."""
    if inventory is None:
        return None
    return shapes_packing([study.shape for study in campaign.studies], pool, inventory)


class _SharedStorage:
    """One storage for every study: the one already opened to check a resumed campaign, else
    opened when the first study is (after every check, so bad input creates no journal)."""

    def __init__(
        self, url: str | None, run_dir: RunDir, existing: optuna.storages.BaseStorage | None
    ) -> None:
        self._url, self._run_dir = url, run_dir
        self._storage = existing

    def get(self) -> optuna.storages.BaseStorage:
        if self._storage is None:
            self._storage = open_storage(self._url, self._run_dir.journal)
        return self._storage


def _check_placeable(campaign: Campaign, study: StudySpec, pool: Pool) -> None:
    if pool.eligible.get(study.shape):
        return
    why = "; ".join(pool.notes) or "the pool has no slot of that shape"
    raise ResourceError(
        f"{campaign.path}:{study.line}: study {study.name!r} needs {study.shape.describe()}, "
        f"but no slot of the pool can run it ({why}). Give its slot a fallback_cpus, change "
        "its slot, or change [pool]."
    )


def _stage_numbers(studies: tuple[StudySpec, ...]) -> dict[str, int]:
    """Stages in order of first appearance; a study without a stage is a stage of its own."""
    numbers: dict[str, int] = {}
    result = {}
    for study in studies:
        key = study.stage or f"\0{study.name}"
        result[study.name] = numbers.setdefault(key, len(numbers))
    return result


def _plan(
    campaign: Campaign,
    study: StudySpec,
    pool: Pool,
    run_dir: RunDir,
    storage: Callable[[], optuna.storages.BaseStorage],
    existing: optuna.storages.BaseStorage | None,
    stage: int,
) -> StudyPlan:
    directions = check_directions(existing, study.name, list(study.directions))

    def open_study() -> optuna.Study:
        opened = optuna.create_study(
            storage=storage(),
            study_name=study.name,
            sampler=make_sampler(study.sampler, study.seed, study.n_trials),
            pruner=make_pruner(study.pruner),
            directions=directions,
            load_if_exists=True,
        )
        _label(opened, study)
        _enqueue_experiments(opened, (*study.experiments, *grid_points(study.grid)))
        return opened

    return StudyPlan(
        name=study.name,
        spec=_objective(study, campaign.path.parent),
        open_study=open_study,
        folder=run_dir.study_folder(study.name),
        slots=tuple(pool.eligible.get(study.shape, ())),
        n_trials=study.n_trials,
        timeout=study.timeout,
        weight=study.weight,
        priority=study.priority,
        stage=stage,
        stage_name=study.stage,
        stored_trials=lambda: stored_trials(existing, study.name),
        stored_time_used=lambda: stored_time_used(existing, study.name),
        callbacks=tuple(_callback(item, study.name) for item in study.callbacks),
    )


def _label(opened: optuna.Study, study: StudySpec) -> None:
    """Which model and matrix values made the study, kept in the storage for the campaign's
    table (``hyperfleet report`` and ``status`` rebuild it without the campaign file)."""
    label = {"family": study.family or study.name, "matrix": study.matrix_values}
    if opened.user_attrs.get(CAMPAIGN_ATTR) != label:
        opened.set_user_attr(CAMPAIGN_ATTR, label)


def _callback(item: Any, study: str) -> Callback:
    """A study's callback: imported from its "MODULE:ATTR", or the callable itself."""
    return load_callback(item, f"study {study!r}: callback") if isinstance(item, str) else item


def _objective(study: StudySpec, base: Path) -> ObjectiveSpec:
    if study.objective_callable is not None:  # a campaign given as Python values
        return spec_from_callable(study.objective_callable, study.args)
    if study.target is not None:
        return spec_from_target(study.target, study.args)
    from hyperfleet.objective.command import CommandObjective
    from hyperfleet.sampling.space import load_space

    assert study.cmd is not None and study.space is not None  # the file's checks promise it
    return spec_from_callable(CommandObjective(study.cmd, load_space(study.space), launch_dir=base))


def _enqueue_experiments(study: optuna.Study, experiments: tuple[Experiment, ...]) -> None:
    # Only a name counts: an objective may have set the attribute to anything (a dict).
    stored = (t.user_attrs.get(EXPERIMENT_ATTR) for t in study.get_trials(deepcopy=False))
    known = {name for name in stored if isinstance(name, str)}
    for experiment in experiments:
        if experiment.name not in known:
            study.enqueue_trial(experiment.params, user_attrs={EXPERIMENT_ATTR: experiment.name})


def _refit_plan(campaign: Campaign, study: StudySpec, force: bool) -> RefitPlan | None:
    """The study's refit, given the study's ``args`` and matrix values (a refit function that
    takes ``args`` gets them: the data set a matrix study is for)."""
    if study.refit is not None:
        plan = plan_from_target(study.refit, force)
    elif study.refit_cmd is not None:
        plan = plan_from_command(study.refit_cmd, study.space, force, campaign.path.parent)
    else:
        return None
    args = {**study.matrix_values, **(study.args or {})}
    return dataclasses.replace(plan, args=args or None, study=study.name)
