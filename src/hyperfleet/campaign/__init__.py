"""A campaign file: one TOML file declaring a pool of slots and the Optuna studies sharing it.

``hyperfleet run campaign.toml`` reads it with :func:`load_campaign`, which only parses and
checks: it runs nothing and writes nothing (it reads the search space files and parses the
objective files a study names, without importing them)::

    [campaign]                 # optional
    name = "tabular"           # default: the file's stem; the run folder is runs/<name>
    timeout = "2h"             # stop starting trials after this long
    ray = "auto"               # or slurm = true, or listen = "HOST:PORT": on many machines

    [pool]                     # optional
    gpus = "all"               # or [0, 1] (indices or UUID strings), or [] for none
    trials_per_gpu = 2         # slot = "gpu" is half a GPU; default "auto": auto packing

    [defaults]                 # optional: any study key, for every [[study]] that lacks it
    direction = "maximize"

    [[study]]                  # one or more
    name = "xgb-{dataset}"
    objective = "models.py:make_xgb"
    args = { dataset = "{dataset}" }
    matrix = { dataset = ["iris", "wine"] }   # one study per combination
    n_trials = 40
    slot = { gpus = "auto" }   # or gpu_memory = "10GiB": as many per GPU as fit (auto packing)

Every mistake raises :class:`~hyperfleet.errors.ConfigError` starting with ``FILE:LINE:``,
naming the table (``[[study]] #2 'xgb'``) and the key. TOML gives no positions, so the line is
found by scanning the text: the key's first assignment inside its table, else the table's
header line.

The package splits the work: :mod:`~hyperfleet.campaign.source` reads the file and points at
its lines, :mod:`~hyperfleet.campaign.studies` checks each ``[[study]]`` table and
:mod:`~hyperfleet.campaign.matrix` expands it over its matrix; :mod:`~hyperfleet.campaign.spec`
holds the results' types, and this module the ``[campaign]`` and ``[pool]`` tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hyperfleet.campaign.source import (
    Source,
    Table,
    boolean,
    check_keys,
    duration,
    integer,
    parse_toml,
    read,
    string,
    top_table,
)
from hyperfleet.campaign.spec import Campaign, CampaignSettings
from hyperfleet.config import RetryPolicy
from hyperfleet.errors import ConfigError
from hyperfleet.resources.shapes import PoolSpec
from hyperfleet.store.rundir import check_folder_name

TABLES = ("campaign", "pool", "defaults", "study")
CAMPAIGN_KEYS = (
    "name",
    "run_dir",
    "storage",
    "sequential",
    "timeout",
    "trial_timeout",
    "retry",
    "max_trials_per_worker",
    "ray",
    "slurm",
    "listen",
)
POOL_KEYS = ("gpus", "trials_per_gpu", "cpu_slots", "threads_per_slot")


def is_campaign_file(target: str) -> bool:
    """Whether ``hyperfleet run TARGET`` names a campaign file rather than an objective."""
    path = Path(target)
    return path.suffix.lower() == ".toml" and path.is_file()


def load_campaign(path: str | Path | Mapping[str, Any]) -> Campaign:
    """Parse and check a campaign file; see the module's documentation for the format. A
    mapping of the same tables is a campaign given as Python values (``run_campaign``): its
    objectives and callbacks may be callables, and its paths are relative to the current
    folder."""
    # Imported here, not at the top: the study modules build this module's dataclasses.
    from hyperfleet.campaign.studies import STUDY_KEYS, StudyContext, studies

    if isinstance(path, Mapping):
        file, document = Path.cwd() / "campaign", dict(path)
        source = Source("run_campaign()", [])
    else:
        file = Path(path)
        text = read(file)
        source = Source(str(file), text.splitlines())
        document = parse_toml(source, text)
    check_keys(Table(source, "", 0, "the file", document), TABLES, "table")
    campaign_table = top_table(source, document, "campaign", CAMPAIGN_KEYS)
    pool_table = top_table(source, document, "pool", POOL_KEYS)
    defaults_table = top_table(source, document, "defaults", STUDY_KEYS)
    settings = _settings(
        campaign_table, default_name="" if source.file == "run_campaign()" else file.stem
    )
    pool = _pool(pool_table)
    context = StudyContext(file.resolve().parent, settings, pool, defaults_table)
    specs = studies(source, document, context)
    return Campaign(file.resolve(), settings, pool, specs)


# ---------------------------------------------------------------------------------------------
# [campaign] and [pool]


def _settings(table: Table, default_name: str) -> CampaignSettings:
    name = string(table, "name", '"tabular"') or default_name
    try:
        check_folder_name(name, "campaign name", "choose another one.")
    except ConfigError as exc:
        table.fail("name", str(exc))
    run_dir = string(table, "run_dir", '"runs/tabular"')
    retry = string(table, "retry", '"crash=1,oom=1"') or ""
    try:
        RetryPolicy.parse(retry)
    except ConfigError as exc:
        table.fail("retry", str(exc))
    return CampaignSettings(
        name=name,
        run_dir=Path(run_dir) if run_dir is not None else None,
        storage=string(table, "storage", '"sqlite:///campaign.db"'),
        sequential=bool(boolean(table, "sequential")),
        timeout=duration(table, "timeout"),
        trial_timeout=duration(table, "trial_timeout"),
        retry=retry,
        max_trials_per_worker=integer(table, "max_trials_per_worker", minimum=1),
        ray=string(table, "ray", '"auto"'),
        slurm=bool(boolean(table, "slurm")),
        listen=string(table, "listen", '"10.0.0.5:7000"'),
    )


def _pool(table: Table) -> PoolSpec:
    value = table.get("trials_per_gpu")
    auto = value in (None, "auto")
    if isinstance(value, str) and not auto:
        table.fail(
            "trials_per_gpu",
            f'{value!r} is neither a whole number nor "auto"; write trials_per_gpu = 2, or '
            'leave it out (or "auto") to pack each GPU with what it can take.',
        )
    return PoolSpec(
        gpus=_pool_gpus(table),
        trials_per_gpu=None if auto else integer(table, "trials_per_gpu", minimum=1),
        cpu_slots=integer(table, "cpu_slots", minimum=0),
        threads_per_slot=integer(table, "threads_per_slot", minimum=1),
    )


def _pool_gpus(table: Table) -> list[str] | None:
    value = table.get("gpus")
    if value is None or value == "all":
        return None
    how = 'write gpus = "all", a list of indices or UUIDs such as [0, 1], or [] for none.'
    if not isinstance(value, list):
        table.fail("gpus", f"{value!r} is not a list of GPUs; {how}")
    gpus = []
    for item in value:
        valid_index = isinstance(item, int) and not isinstance(item, bool) and item >= 0
        if not valid_index and not (isinstance(item, str) and item.strip()):
            table.fail("gpus", f"{item!r} is neither a GPU index nor a UUID; {how}")
        gpus.append(str(item).strip())
    return gpus
