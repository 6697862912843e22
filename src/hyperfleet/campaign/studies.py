"""The ``[[study]]`` tables: each one checked once, then expanded over its matrix.

A table's checks cover what it runs (objective or cmd with its space), its directions,
experiments, budget and slot shape; the ``[defaults]`` fill in the keys it lacks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperfleet.campaign.folders import check_experiment_folders, check_study_folder
from hyperfleet.campaign.matrix import Blueprint, combinations, expand
from hyperfleet.campaign.source import (
    Source,
    Table,
    boolean,
    check_keys,
    choice,
    duration,
    integer,
    string,
    table_of_lists,
)
from hyperfleet.campaign.spec import CampaignSettings, Experiment, StudySpec
from hyperfleet.config import parse_memory
from hyperfleet.errors import ConfigError, ObjectiveError
from hyperfleet.resources.packing import AUTO
from hyperfleet.resources.shapes import PoolSpec, Shape
from hyperfleet.sampling.samplers import MAX_SEED, PRUNERS, SAMPLERS, check_sampler
from hyperfleet.sampling.space import SearchSpace, load_space
from hyperfleet.workers.packaging import spec_from_target

STUDY_KEYS = (
    "name",
    "objective",
    "args",
    "cmd",
    "space",
    "direction",
    "directions",
    "sampler",
    "seed",
    "pruner",
    "n_trials",
    "timeout",
    "slot",
    "weight",
    "priority",
    "stage",
    "matrix",
    "experiments",
    "experiments_only",
    "grid",
    "refit",
    "refit_cmd",
    "callbacks",
)
SLOT_KEYS = ("gpus", "cpus", "fallback_cpus", "gpu_memory")
EXPERIMENT_KEYS = ("name", "params")
DIRECTIONS = ("minimize", "maximize")
# A study that sets a key of one side hides the [defaults] keys of the other side, so that
# [defaults] objective = ... does not clash with a study's own cmd = ... (and so on).
_EXCLUSIVE_SIDES = (
    ({"objective", "args"}, {"cmd", "space"}),
    ({"direction"}, {"directions"}),
    ({"refit"}, {"refit_cmd"}),
)


# ---------------------------------------------------------------------------------------------
# [[study]] tables


@dataclass(frozen=True)
class StudyContext:
    folder: Path  # the campaign file's folder: relative paths start there
    settings: CampaignSettings
    pool: PoolSpec
    defaults: Table


def studies(
    source: Source, document: Mapping[str, Any], context: StudyContext
) -> tuple[StudySpec, ...]:
    """Every study of the file in file order, each table expanded over its matrix."""
    raw = document.get("study")
    top = Table(source, "", 0, "the file", document)
    if raw is None:
        top.fail(None, "declares no study; add at least one [[study]] table with an objective.")
    if not isinstance(raw, list) or not raw:
        top.fail("study", "must be an array of tables; write each study as a [[study]] table.")
    specs: list[StudySpec] = []
    seen: dict[str, Table] = {}
    folders: dict[str, str] = {}  # each study's folder name, to the study that has it
    for occurrence, data in enumerate(raw):
        table = _study_table(source, occurrence, data, context.defaults)
        blueprint = _blueprint(table, context)
        for values in combinations(table):
            spec = expand(blueprint, values, index=len(specs))
            _check_unique(seen, spec.name, table)
            check_study_folder(folders, spec.name, table)
            specs.append(spec)
    return tuple(specs)


def _study_table(source: Source, occurrence: int, data: Any, defaults: Table) -> Table:
    number = occurrence + 1
    if not isinstance(data, Mapping):
        bare = Table(source, "study", occurrence, f"[[study]] #{number}", {})
        bare.fail(None, "must be a table of study keys.")
    name = data.get("name", defaults.data.get("name"))
    label = f"[[study]] #{number}" + _study_hint(name, data, defaults.data)
    inherited = Table(source, "defaults", 0, "[defaults]", _inherited(defaults.data, data))
    table = Table(source, "study", occurrence, label, data, inherited)
    check_keys(table, STUDY_KEYS, "key")
    return table


def _study_hint(name: Any, study: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """How a message names a study besides its number: its name, else what it runs."""
    if isinstance(name, str):
        return f" {name!r}"
    for key in ("objective", "cmd"):
        value = study.get(key, defaults.get(key))
        if isinstance(value, str):
            return f" ({key} {value!r})"
    return ""


def _inherited(defaults: Mapping[str, Any], study: Mapping[str, Any]) -> dict[str, Any]:
    hidden: set[str] = set()
    for one_side, other_side in _EXCLUSIVE_SIDES:
        if one_side & study.keys():
            hidden |= other_side
        if other_side & study.keys():
            hidden |= one_side
    return {key: value for key, value in defaults.items() if key not in hidden}


def _check_unique(seen: dict[str, Table], name: str, table: Table) -> None:
    first = seen.get(name)
    if first is table:
        table.fail(
            "name",
            f"two combinations of the matrix are both named {name!r}; put every matrix "
            "{variable} in the name (or leave placeholders out to have the values appended).",
        )
    if first is not None:
        table.fail(
            "name",
            f"the study name {name!r} is already used by {first.label} (line {first.line()}); "
            "give each study its own name.",
        )
    seen[name] = table


def _blueprint(table: Table, context: StudyContext) -> Blueprint:
    target, space, space_path, base_name = _objective(table, context.folder)
    experiments = _experiments(table)
    experiments_only = bool(boolean(table, "experiments_only"))
    grid = table_of_lists(table, "grid", "{ max_depth = [3, 6] }")
    _check_combination(table, experiments, experiments_only, grid)
    check_experiment_folders(table, experiments, grid)
    timeout = duration(table, "timeout")
    n_trials = _n_trials(table, experiments, experiments_only, grid)
    if n_trials is None and timeout is None and context.settings.timeout is None:
        table.fail(
            "n_trials",
            "the study has no budget: it sets neither n_trials nor timeout, and [campaign] "
            "sets no timeout; add n_trials = 50 (or a timeout) to the study or to [defaults].",
        )
    refit = table.get("refit")
    refit_target = _target(table, "refit", context.folder)[0] if refit is not None else None
    directions = _directions(table)
    sampler, seed = choice(table, "sampler", SAMPLERS, "auto"), integer(table, "seed")
    _check_sampler(table, sampler, seed, len(directions))
    settings = {
        "directions": directions,
        "sampler": sampler,
        "seed": seed,
        "pruner": choice(table, "pruner", PRUNERS, "median"),
        "n_trials": n_trials,
        "timeout": timeout,
        "shape": _shape(table, context.pool),
        "weight": _weight(table),
        "priority": integer(table, "priority") or 0,
        "experiments": experiments,
        "experiments_only": experiments_only,
        "grid": grid,
        "refit": refit_target,
        "callbacks": _callbacks(table, context.folder),
        "objective_callable": objective if callable(objective := table.get("objective")) else None,
    }
    return Blueprint(table, base_name, target, space, space_path, settings)


def _check_sampler(table: Table, sampler: str, seed: int | None, n_objectives: int) -> None:
    """What the sampler would refuse only once trials run, refused at the key that says it."""
    try:
        check_sampler(sampler, seed, n_objectives)
    except ConfigError as exc:
        seed_ok = seed is None or 0 <= seed <= MAX_SEED
        table.fail("sampler" if seed_ok else "seed", str(exc))


def _objective(
    table: Table, folder: Path
) -> tuple[str | None, SearchSpace | None, Path | None, str]:
    """(target, space, space path, default name) of the study, after the exclusivity rules."""
    objective, cmd = table.get("objective"), table.get("cmd")
    if objective is not None and cmd is not None:
        table.fail("cmd", "a study runs either objective or cmd, not both; remove one of them.")
    if objective is None and cmd is None:
        table.fail(
            "objective",
            'is missing; set objective = "FILE.py:FUNCTION" (or cmd = "python train.py '
            '--lr {lr}" with space = "space.toml").',
        )
    if table.has("refit") and table.has("refit_cmd"):
        table.fail("refit_cmd", "refit and refit_cmd cannot be used together; remove one.")
    if objective is not None:
        if table.has("space"):
            table.fail(
                "space", "only works with cmd; remove space or use cmd instead of objective."
            )
        if callable(objective):  # a campaign given as Python values (run_campaign)
            return None, None, None, getattr(objective, "__name__", "objective")
        target, base_name = _target(table, "objective", folder)
        return target, None, None, base_name
    if table.has("args"):
        table.fail("args", "only works with objective (a factory); remove args or use objective.")
    command = string(table, "cmd", '"python train.py --lr {lr}"')
    assert command is not None
    space_path, space = _space(table, folder)
    return None, space, space_path, _command_stem(command)


def _target(table: Table, key: str, folder: Path) -> tuple[str, str]:
    """("ABS/FILE.py:FUNCTION" or "MODULE:FUNCTION", the file's or module's stem)."""
    text = string(table, key, '"models.py:objective"')
    assert text is not None
    location, sep, function = text.rpartition(":")
    if not sep or not location or not function:
        table.fail(key, f"cannot read {text!r}; write FILE.py:FUNCTION or MODULE:FUNCTION.")
    is_file = location.endswith(".py") or "/" in location or "\\" in location
    if is_file:
        location = str((folder / location).resolve())
    try:
        spec_from_target(f"{location}:{function}")
    except (ObjectiveError, ConfigError) as exc:
        relative = " (paths are relative to the campaign file's folder)" if is_file else ""
        table.fail(key, f"{exc}{relative}")
    stem = Path(location).stem if is_file else location.rpartition(".")[2]
    return f"{location}:{function}", stem


def _callbacks(table: Table, folder: Path) -> tuple[Any, ...]:
    """The study's Optuna callbacks, ["MODULE:ATTR" or "FILE.py:ATTR", ...], files made
    absolute, each imported in the controller when the run starts; or, in a campaign given as
    Python values, the callables themselves."""
    given = table.get("callbacks")
    if given is None:
        return ()
    if not isinstance(given, list | tuple) or not all(
        isinstance(item, str) or callable(item) for item in given
    ):
        table.fail("callbacks", 'must be a list of strings, e.g. callbacks = ["stops.py:early"]')
    found: list[Any] = []
    for text in given:
        if callable(text):
            found.append(text)
            continue
        location, sep, attr = text.rpartition(":")
        if not sep or not location or not attr:
            table.fail("callbacks", f"cannot read {text!r}; write FILE.py:ATTR or MODULE:ATTR.")
        if location.endswith(".py") or "/" in location:
            location = str((folder / location).resolve())
        found.append(f"{location}:{attr}")
    return tuple(found)


def _space(table: Table, folder: Path) -> tuple[Path, SearchSpace]:
    text = string(table, "space", '"space.toml"')
    if text is None:
        table.fail(
            "space",
            'is missing: a cmd study needs a search space file; add space = "space.toml" '
            "(relative to the campaign file's folder).",
        )
    path = (folder / text).resolve()
    if not path.is_file():
        table.fail("space", f"the search space file {path} does not exist; check the path.")
    try:
        return path, load_space(path)
    except ConfigError as exc:
        table.fail("space", str(exc))


def _command_stem(command: str) -> str:
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    scripts = [word for word in words if word.endswith(".py")]
    return Path(scripts[0] if scripts else words[0] if words else "command").stem


def _directions(table: Table) -> tuple[str, ...]:
    if table.has("direction") and table.has("directions"):
        table.fail("directions", "use direction (one objective) or directions, not both.")
    if not table.has("directions"):
        return (choice(table, "direction", DIRECTIONS, "minimize"),)
    value = table.get("directions")
    if not isinstance(value, list) or not value:
        table.fail("directions", 'must be a non-empty list, e.g. ["minimize", "maximize"].')
    for item in value:
        if not isinstance(item, str) or item.lower() not in DIRECTIONS:
            table.fail("directions", f"{item!r} is neither 'minimize' nor 'maximize'.")
    return tuple(item.lower() for item in value)


def _weight(table: Table) -> float:
    value = table.get("weight")
    if value is None:
        return 1.0
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid or not math.isfinite(value) or value <= 0:
        table.fail("weight", f"must be a positive number (a fair share), not {value!r}.")
    return float(value)


def _experiments(table: Table) -> tuple[Experiment, ...]:
    value = table.get("experiments")
    if value is None:
        return ()
    example = 'experiments = [{ name = "baseline", params = { lr = 0.01 } }]'
    if not isinstance(value, list):
        table.fail("experiments", f"must be a list of tables, for example {example}.")
    experiments: list[Experiment] = []
    for number, item in enumerate(value, 1):
        where = f"experiment #{number}"
        if not isinstance(item, Mapping):
            table.fail("experiments", f"{where} must be a table, for example {example}.")
        unknown = sorted(set(item) - set(EXPERIMENT_KEYS))
        if unknown:
            table.fail(
                "experiments", f"{where} has unknown key(s) {unknown}; it takes name and params."
            )
        name, params = item.get("name"), item.get("params")
        if not isinstance(name, str) or not name.strip():
            table.fail("experiments", f"{where} needs a name (a non-empty string); {example}.")
        if not isinstance(params, Mapping):
            table.fail("experiments", f"{where} ({name!r}) needs params, a table; {example}.")
        if any(e.name == name for e in experiments):
            table.fail("experiments", f"{where}: the name {name!r} is used twice; rename one.")
        experiments.append(Experiment(name, dict(params)))
    return tuple(experiments)


def _check_combination(
    table: Table,
    experiments: tuple[Experiment, ...],
    experiments_only: bool,
    grid: dict[str, list[Any]] | None,
) -> None:
    if experiments_only and not experiments:
        table.fail("experiments_only", "is true but the study has no experiments; add experiments.")
    if experiments_only and grid is not None:
        table.fail(
            "grid", "grid and experiments_only cannot be used together; the grid would never run."
        )


def _n_trials(
    table: Table,
    experiments: tuple[Experiment, ...],
    experiments_only: bool,
    grid: dict[str, list[Any]] | None,
) -> int | None:
    n_trials = integer(table, "n_trials", minimum=1)
    if n_trials is not None:
        return n_trials
    if experiments_only:
        return len(experiments)
    if grid is not None:
        return math.prod(len(values) for values in grid.values())
    return None


# ---------------------------------------------------------------------------------------------
# Slot shapes


def _shape(table: Table, pool: PoolSpec) -> Shape:
    value = table.get("slot")
    if value is None or value == "gpu":
        shape = _gpu_shape(pool)
    elif value == "cpu":
        shape = Shape(cpus=pool.threads_per_slot)
    elif isinstance(value, Mapping):
        shape = _shape_table(table, value)
    else:
        table.fail(
            "slot",
            f'{value!r} is not a slot; write "gpu", "cpu" or a table such as '
            "{ gpus = 0.5, fallback_cpus = 2 } or { cpus = 4 }.",
        )
    # Shape.check knows which shares, GPU counts and core counts a machine can grant, and
    # reports values of the wrong type too.
    shape.check(f"{table.source.file}:{table.line('slot')}: {table.label}, key 'slot'")
    return dataclasses.replace(shape, gpus=float(shape.gpus))


def _gpu_shape(pool: PoolSpec) -> Shape:
    """The slot "gpu": packed by what each GPU can take, as for a single search, unless
    [pool] trials_per_gpu fixes the share."""
    fallback = pool.threads_per_slot or 1
    if pool.trials_per_gpu is None:
        return Shape(gpus=1.0, fallback_cpus=fallback, auto=True)
    return Shape(gpus=1 / pool.trials_per_gpu, fallback_cpus=fallback)


def _shape_table(table: Table, value: Mapping[str, Any]) -> Shape:
    for key in value:
        if key not in SLOT_KEYS:
            close = difflib.get_close_matches(key, SLOT_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            table.fail(
                "slot", f"unknown key {key!r}; {hint}a slot table takes {', '.join(SLOT_KEYS)}."
            )
    memory = _gpu_memory(table, value)
    gpus = value.get("gpus")
    # { gpu_memory = "10GiB" } alone (or with fallback_cpus) means gpus = "auto"; with cpus and
    # no gpus it is a CPU trial, as { cpus = 4 } is, and refused below.
    implied = gpus is None and memory is not None and _is_gpu_table(value)
    if _is_auto(gpus) or implied:
        return Shape(
            gpus=1.0,
            cpus=value.get("cpus"),
            fallback_cpus=value.get("fallback_cpus"),
            auto=True,
            gpu_memory_mib=memory,
        )
    if memory is not None:
        _refuse_memory_with_fixed_gpus(table, value)
    # Raw values: _shape has them checked by Shape.check.
    return Shape(
        gpus=0.0 if gpus is None else gpus,
        cpus=value.get("cpus"),
        fallback_cpus=value.get("fallback_cpus"),
    )


def _is_gpu_table(value: Mapping[str, Any]) -> bool:
    """Whether a slot table without gpus describes a GPU trial: not when it sets only cpus."""
    return "cpus" not in value or "fallback_cpus" in value


def _is_auto(gpus: Any) -> bool:
    return isinstance(gpus, str) and gpus.strip().lower() == AUTO


def _gpu_memory(table: Table, value: Mapping[str, Any]) -> int | None:
    """What one trial takes on its GPU (``gpu_memory = "10GiB"``), in MiB; None when not set."""
    try:
        return parse_memory(value.get("gpu_memory"), "gpu_memory")
    except ConfigError as exc:
        table.fail("slot", str(exc))


def _refuse_memory_with_fixed_gpus(table: Table, value: Mapping[str, Any]) -> None:
    """gpu_memory packs trials by their memory: it goes with gpus = "auto" (or no gpus) only."""
    gpus = value.get("gpus")
    if gpus is None or gpus == 0:
        table.fail(
            "slot",
            "gpu_memory is set on a CPU trial (the slot asks for no GPU); it says what one "
            'trial takes on its GPU. Add gpus = "auto" to run the study on GPUs packed by '
            "that amount, or remove gpu_memory.",
        )
    table.fail(
        "slot",
        f"gpu_memory is set but gpus = {gpus!r} fixes what each trial gets; auto packing "
        'packs trials by gpu_memory on one GPU each: write gpus = "auto" (or leave gpus out), '
        "or remove gpu_memory.",
    )
