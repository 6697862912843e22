"""A campaign file once read: its settings, its pool and its studies, every default filled in.

Plain values, apart from the reading (:mod:`hyperfleet.campaign` and the modules beside it), so
that every step of the reading, and whatever runs a campaign, shares them without a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperfleet.resources.shapes import PoolSpec, Shape


@dataclass(frozen=True)
class Experiment:
    """A point to evaluate before the sampler's own suggestions (Optuna's enqueue_trial)."""

    name: str
    params: dict[str, Any]


@dataclass(frozen=True)
class StudySpec:
    """One study after matrix expansion, with every default filled in and every path absolute."""

    name: str
    index: int  # 0-based position after expansion, in file order
    line: int  # the [[study]] header line, for later messages
    target: str | None  # "ABS/PATH/FILE.py:FUNCTION" or "MODULE:FUNCTION"
    args: dict[str, Any] | None  # factory arguments (None: target is the objective itself)
    cmd: str | None
    space: Path | None
    directions: tuple[str, ...]
    sampler: str
    seed: int | None
    pruner: str
    n_trials: int | None
    timeout: float | None
    shape: Shape
    weight: float
    priority: int
    stage: str  # "" when not given
    experiments: tuple[Experiment, ...]
    experiments_only: bool
    grid: dict[str, list[Any]] | None
    refit: str | None
    refit_cmd: str | None
    matrix_values: dict[str, Any]  # the combination that made this study ({} without a matrix)
    family: str = ""  # the [[study]]'s name before expansion ("xgb-{dataset}"): the model
    # Optuna callbacks: "MODULE:ATTR" or "ABS/FILE.py:ATTR", or callables (run_campaign).
    callbacks: tuple[Any, ...] = ()
    objective_callable: Any = None  # the objective itself, in a campaign given as Python values


@dataclass(frozen=True)
class CampaignSettings:
    name: str
    run_dir: Path | None
    storage: str | None
    sequential: bool
    timeout: float | None
    trial_timeout: float | None
    retry: str
    max_trials_per_worker: int | None
    # Many machines: the engine that starts one agent per node, or where to wait for agents.
    ray: str | None = None
    slurm: bool = False
    listen: str | None = None


@dataclass(frozen=True)
class Campaign:
    path: Path  # absolute
    settings: CampaignSettings
    pool: PoolSpec
    studies: tuple[StudySpec, ...]
