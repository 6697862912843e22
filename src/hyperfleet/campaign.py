"""A campaign file: one TOML file declaring a pool of slots and the Optuna studies sharing it.

``hyperfleet run campaign.toml`` reads it with :func:`load_campaign`, which only parses and
checks: it runs nothing and writes nothing (it reads the search space files and parses the
objective files a study names, without importing them)::

    [campaign]                 # optional
    name = "tabular"           # default: the file's stem; the run folder is runs/<name>
    timeout = "2h"             # stop starting trials after this long

    [pool]                     # optional
    gpus = "all"               # or [0, 1] (indices or UUID strings), or [] for none
    trials_per_gpu = 2

    [defaults]                 # optional: any study key, for every [[study]] that lacks it
    direction = "maximize"

    [[study]]                  # one or more
    name = "xgb-{dataset}"
    objective = "models.py:make_xgb"
    args = { dataset = "{dataset}" }
    matrix = { dataset = ["iris", "wine"] }   # one study per combination
    n_trials = 40

Every mistake raises :class:`~hyperfleet.errors.ConfigError` starting with ``FILE:LINE:``,
naming the table (``[[study]] #2 'xgb'``) and the key. TOML gives no positions, so the line is
found by scanning the text: the key's first assignment inside its table, else the table's
header line.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
import shlex
import string
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hyperfleet.command import check_template, split_command
from hyperfleet.config import RetryPolicy, parse_duration
from hyperfleet.errors import ConfigError, ObjectiveError
from hyperfleet.resources.shapes import PoolSpec, Shape
from hyperfleet.samplers import PRUNERS, SAMPLERS
from hyperfleet.space import NAME_PATTERN, SearchSpace, load_space
from hyperfleet.workers.packaging import spec_from_target

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (exercised on Python 3.10 only)
    import tomli as tomllib  # type: ignore[import-not-found]

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
)
POOL_KEYS = ("gpus", "trials_per_gpu", "cpu_slots", "threads_per_slot")
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
)
SLOT_KEYS = ("gpus", "cpus", "fallback_cpus")
EXPERIMENT_KEYS = ("name", "params")
DIRECTIONS = ("minimize", "maximize")
# A study that sets a key of one side hides the [defaults] keys of the other side, so that
# [defaults] objective = ... does not clash with a study's own cmd = ... (and so on).
_EXCLUSIVE_SIDES = (
    ({"objective", "args"}, {"cmd", "space", "refit_cmd"}),
    ({"direction"}, {"directions"}),
    ({"refit"}, {"refit_cmd"}),
)
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
# A table header: [pool], [[study]], [study.slot], ["quoted"]; no commas, unlike an array line.
_HEADER = re.compile(r"""^\s*\[\[?([\w\-."' ]+)\]\]?\s*(?:#.*)?$""")


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


@dataclass(frozen=True)
class Campaign:
    path: Path  # absolute
    settings: CampaignSettings
    pool: PoolSpec
    studies: tuple[StudySpec, ...]


def is_campaign_file(target: str) -> bool:
    """Whether ``hyperfleet run TARGET`` names a campaign file rather than an objective."""
    path = Path(target)
    return path.suffix.lower() == ".toml" and path.is_file()


def load_campaign(path: str | Path) -> Campaign:
    """Parse and check a campaign file; see the module's documentation for the format."""
    file = Path(path)
    text = _read(file)
    source = _Source(str(file), text.splitlines())
    document = _parse_toml(source, text)
    _check_keys(_Table(source, "", 0, "the file", document), TABLES, "table")
    campaign_table = _top_table(source, document, "campaign", CAMPAIGN_KEYS)
    pool_table = _top_table(source, document, "pool", POOL_KEYS)
    defaults_table = _top_table(source, document, "defaults", STUDY_KEYS)
    settings = _settings(campaign_table, default_name=file.stem)
    pool = _pool(pool_table)
    context = _StudyContext(file.resolve().parent, settings, pool, defaults_table)
    studies = _studies(source, document, context)
    return Campaign(file.resolve(), settings, pool, studies)


# ---------------------------------------------------------------------------------------------
# Reading the file and pointing at its lines


def _read(file: Path) -> str:
    if not file.exists():
        raise ConfigError(f"campaign file {file} does not exist; check the path.")
    if not file.is_file():
        raise ConfigError(f"campaign file {file} is not a file; give the path of a .toml file.")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read campaign file {file} ({exc}); check its permissions and that it is "
            "UTF-8 text."
        ) from None


def _parse_toml(source: _Source, text: str) -> dict[str, Any]:
    try:
        document: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_POSITION.search(str(exc))
        where = f"{source.file}:{found.group(1)}" if found else source.file
        raise ConfigError(f"{where}: not valid TOML: {exc}. Fix the file and run again.") from None
    return document


@dataclass(frozen=True)
class _Header:
    line: int  # 1-based
    parts: tuple[str, ...]  # [study.matrix] -> ("study", "matrix")


class _Source:
    """The raw text, to find the line of a table's header or of one of its keys."""

    def __init__(self, file: str, lines: list[str]) -> None:
        self.file = file
        self.lines = lines
        self.headers = [
            _Header(number, _header_parts(found.group(1)))
            for number, line in enumerate(lines, 1)
            if (found := _HEADER.match(line))
        ]

    def line_of(self, table: str, occurrence: int, key: str | None) -> int:
        """The line assigning ``key`` in the ``occurrence``-th ``[table]`` (its header if none)."""
        if not table:
            return self._top_level_line(key) if key else 1
        own = [i for i, h in enumerate(self.headers) if h.parts == (table,)]
        if occurrence >= len(own):
            return self._top_level_line(table)
        first = own[occurrence]
        start = self.headers[first].line
        if key is None:
            return start
        end, subtables = len(self.lines) + 1, []
        for header in self.headers[first + 1 :]:
            if header.parts == (table,) or header.parts[0] != table:
                end = header.line
                break
            subtables.append(header)
        for header in subtables:
            if header.parts[1:2] == (key,):
                return header.line
        # A table's own keys come before its first sub-table.
        own_end = subtables[0].line if subtables else end
        return self._assignment(key, start + 1, own_end) or start

    def _top_level_line(self, key: str) -> int:
        for header in self.headers:
            if header.parts[0] == key:
                return header.line
        top_end = self.headers[0].line if self.headers else len(self.lines) + 1
        return self._assignment(key, 1, top_end) or 1

    def _assignment(self, key: str, start: int, end: int) -> int | None:
        pattern = re.compile(
            rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*[=.]"""
        )
        for number in range(start, min(end, len(self.lines) + 1)):
            if pattern.match(self.lines[number - 1]):
                return number
        return None


def _header_parts(inside: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in inside.split("."))


@dataclass(frozen=True)
class _Table:
    """One table of the file, able to say where each of its keys is when a value is wrong."""

    source: _Source
    name: str  # "campaign", "pool", "defaults", "study"; "" for the top level
    occurrence: int  # which [[study]], 0-based
    label: str  # how messages name it: "[pool]", "[[study]] #2 'xgb'"
    data: Mapping[str, Any]
    # For a study: the [defaults] keys it inherits (those it does not set itself).
    inherited: _Table | None = None

    def get(self, key: str) -> Any:
        if key in self.data:
            return self.data[key]
        return self.inherited.get(key) if self.inherited is not None else None

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def line(self, key: str | None = None) -> int:
        return self.source.line_of(self.name, self.occurrence, key)

    def fail(self, key: str | None, problem: str) -> NoReturn:
        inherited = self.inherited
        if key is not None and key not in self.data and inherited and key in inherited.data:
            inherited._raise(f"{inherited.label} (applied to {self.label})", key, problem)
        self._raise(self.label, key, problem)

    def _raise(self, label: str, key: str | None, problem: str) -> NoReturn:
        where = f"{label}, key {key!r}" if key else label
        raise ConfigError(f"{self.source.file}:{self.line(key)}: {where}: {problem}")


def _top_table(
    source: _Source, document: Mapping[str, Any], name: str, keys: tuple[str, ...]
) -> _Table:
    data = document.get(name, {})
    table = _Table(source, name, 0, f"[{name}]", data if isinstance(data, Mapping) else {})
    if not isinstance(data, Mapping):
        top = _Table(source, "", 0, "the file", document)
        top.fail(name, f"must be a table; write a [{name}] header with its keys below it.")
    _check_keys(table, keys, "key")
    return table


def _check_keys(table: _Table, known: Iterable[str], what: str) -> None:
    known = tuple(known)
    for key in table.data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            table.fail(key, f"unknown {what}; {hint}the {what}s allowed are {', '.join(known)}.")


# ---------------------------------------------------------------------------------------------
# Typed values (None when absent)


def _string(table: _Table, key: str, example: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        table.fail(
            key, f"must be a non-empty string, not {value!r}; for example {key} = {example}."
        )
    return value


def _integer(table: _Table, key: str, minimum: int | None = None) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        table.fail(key, f"must be a whole number, not {value!r}.")
    if minimum is not None and value < minimum:
        table.fail(key, f"must be at least {minimum}, not {value}; set {key} = {minimum} or more.")
    return value


def _boolean(table: _Table, key: str) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        table.fail(key, f"must be true or false, not {value!r}.")
    return value


def _duration(table: _Table, key: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        table.fail(key, f'must be seconds or a duration such as "30m", not {value!r}.')
    try:
        return parse_duration(value, what=key)
    except ConfigError as exc:
        table.fail(key, str(exc))


def _choice(table: _Table, key: str, choices: Iterable[str], default: str) -> str:
    choices = tuple(choices)
    value = table.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or value.lower() not in choices:
        close = difflib.get_close_matches(str(value).lower(), choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        table.fail(key, f"{value!r} is not one of {', '.join(choices)}; {hint}pick one of them.")
    return value.lower()


def _table_of_lists(table: _Table, key: str, example: str) -> dict[str, list[Any]] | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        table.fail(key, f"must be a non-empty table of lists, for example {key} = {example}.")
    for name, values in value.items():
        if not isinstance(values, list) or not values:
            table.fail(
                key,
                f"{name!r} must be a non-empty list of values, not {values!r}; for example "
                f"{key} = {example}.",
            )
    return {str(name): list(values) for name, values in value.items()}


# ---------------------------------------------------------------------------------------------
# [campaign] and [pool]


def _settings(table: _Table, default_name: str) -> CampaignSettings:
    name = _string(table, "name", '"tabular"') or default_name
    if "/" in name or "\\" in name:
        table.fail("name", f"{name!r} names a folder under runs/, so it cannot hold a slash.")
    run_dir = _string(table, "run_dir", '"runs/tabular"')
    retry = _string(table, "retry", '"interrupted=1,crash=1"') or ""
    try:
        RetryPolicy.parse(retry)
    except ConfigError as exc:
        table.fail("retry", str(exc))
    return CampaignSettings(
        name=name,
        run_dir=Path(run_dir) if run_dir is not None else None,
        storage=_string(table, "storage", '"sqlite:///campaign.db"'),
        sequential=bool(_boolean(table, "sequential")),
        timeout=_duration(table, "timeout"),
        trial_timeout=_duration(table, "trial_timeout"),
        retry=retry,
        max_trials_per_worker=_integer(table, "max_trials_per_worker", minimum=1),
    )


def _pool(table: _Table) -> PoolSpec:
    trials_per_gpu = _integer(table, "trials_per_gpu", minimum=1)
    return PoolSpec(
        gpus=_pool_gpus(table),
        trials_per_gpu=1 if trials_per_gpu is None else trials_per_gpu,
        cpu_slots=_integer(table, "cpu_slots", minimum=0),
        threads_per_slot=_integer(table, "threads_per_slot", minimum=1),
    )


def _pool_gpus(table: _Table) -> list[str] | None:
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


# ---------------------------------------------------------------------------------------------
# [[study]] tables


@dataclass(frozen=True)
class _StudyContext:
    folder: Path  # the campaign file's folder: relative paths start there
    settings: CampaignSettings
    pool: PoolSpec
    defaults: _Table


@dataclass(frozen=True)
class _Blueprint:
    """What a [[study]] table says before its matrix is expanded; checked once per table."""

    table: _Table
    base_name: str  # the default name: the objective's or the command's stem
    target: str | None
    space: SearchSpace | None
    space_path: Path | None
    settings: dict[str, Any]  # the StudySpec fields that no matrix value changes


def _studies(
    source: _Source, document: Mapping[str, Any], context: _StudyContext
) -> tuple[StudySpec, ...]:
    raw = document.get("study")
    top = _Table(source, "", 0, "the file", document)
    if raw is None:
        top.fail(None, "declares no study; add at least one [[study]] table with an objective.")
    if not isinstance(raw, list) or not raw:
        top.fail("study", "must be an array of tables; write each study as a [[study]] table.")
    specs: list[StudySpec] = []
    seen: dict[str, _Table] = {}
    for occurrence, data in enumerate(raw):
        table = _study_table(source, occurrence, data, context.defaults)
        blueprint = _blueprint(table, context)
        for values in _combinations(table):
            spec = _expand(blueprint, values, index=len(specs))
            _check_unique(seen, spec.name, table)
            specs.append(spec)
    return tuple(specs)


def _study_table(source: _Source, occurrence: int, data: Any, defaults: _Table) -> _Table:
    number = occurrence + 1
    if not isinstance(data, Mapping):
        bare = _Table(source, "study", occurrence, f"[[study]] #{number}", {})
        bare.fail(None, "must be a table of study keys.")
    name = data.get("name", defaults.data.get("name"))
    label = f"[[study]] #{number}" + _study_hint(name, data, defaults.data)
    inherited = _Table(source, "defaults", 0, "[defaults]", _inherited(defaults.data, data))
    table = _Table(source, "study", occurrence, label, data, inherited)
    _check_keys(table, STUDY_KEYS, "key")
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


def _check_unique(seen: dict[str, _Table], name: str, table: _Table) -> None:
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


def _blueprint(table: _Table, context: _StudyContext) -> _Blueprint:
    target, space, space_path, base_name = _objective(table, context.folder)
    experiments = _experiments(table)
    experiments_only = bool(_boolean(table, "experiments_only"))
    grid = _table_of_lists(table, "grid", "{ max_depth = [3, 6] }")
    _check_combination(table, experiments, experiments_only, grid)
    timeout = _duration(table, "timeout")
    n_trials = _n_trials(table, experiments, experiments_only, grid)
    if n_trials is None and timeout is None and context.settings.timeout is None:
        table.fail(
            "n_trials",
            "the study has no budget: it sets neither n_trials nor timeout, and [campaign] "
            "sets no timeout; add n_trials = 50 (or a timeout) to the study or to [defaults].",
        )
    refit = table.get("refit")
    refit_target = _target(table, "refit", context.folder)[0] if refit is not None else None
    settings = {
        "directions": _directions(table),
        "sampler": _choice(table, "sampler", SAMPLERS, "tpe"),
        "seed": _integer(table, "seed"),
        "pruner": _choice(table, "pruner", PRUNERS, "median"),
        "n_trials": n_trials,
        "timeout": timeout,
        "shape": _shape(table, context.pool),
        "weight": _weight(table),
        "priority": _integer(table, "priority") or 0,
        "experiments": experiments,
        "experiments_only": experiments_only,
        "grid": grid,
        "refit": refit_target,
    }
    return _Blueprint(table, base_name, target, space, space_path, settings)


def _objective(
    table: _Table, folder: Path
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
        for key in ("space", "refit_cmd"):
            if table.has(key):
                table.fail(
                    key, f"only works with cmd; remove {key} or use cmd instead of objective."
                )
        target, base_name = _target(table, "objective", folder)
        return target, None, None, base_name
    if table.has("args"):
        table.fail("args", "only works with objective (a factory); remove args or use objective.")
    command = _string(table, "cmd", '"python train.py --lr {lr}"')
    assert command is not None
    space_path, space = _space(table, folder)
    return None, space, space_path, _command_stem(command)


def _target(table: _Table, key: str, folder: Path) -> tuple[str, str]:
    """("ABS/FILE.py:FUNCTION" or "MODULE:FUNCTION", the file's or module's stem)."""
    text = _string(table, key, '"models.py:objective"')
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


def _space(table: _Table, folder: Path) -> tuple[Path, SearchSpace]:
    text = _string(table, "space", '"space.toml"')
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


def _directions(table: _Table) -> tuple[str, ...]:
    if table.has("direction") and table.has("directions"):
        table.fail("directions", "use direction (one objective) or directions, not both.")
    if not table.has("directions"):
        return (_choice(table, "direction", DIRECTIONS, "minimize"),)
    value = table.get("directions")
    if not isinstance(value, list) or not value:
        table.fail("directions", 'must be a non-empty list, e.g. ["minimize", "maximize"].')
    for item in value:
        if not isinstance(item, str) or item.lower() not in DIRECTIONS:
            table.fail("directions", f"{item!r} is neither 'minimize' nor 'maximize'.")
    return tuple(item.lower() for item in value)


def _weight(table: _Table) -> float:
    value = table.get("weight")
    if value is None:
        return 1.0
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid or not math.isfinite(value) or value <= 0:
        table.fail("weight", f"must be a positive number (a fair share), not {value!r}.")
    return float(value)


def _experiments(table: _Table) -> tuple[Experiment, ...]:
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
    table: _Table,
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
    table: _Table,
    experiments: tuple[Experiment, ...],
    experiments_only: bool,
    grid: dict[str, list[Any]] | None,
) -> int | None:
    n_trials = _integer(table, "n_trials", minimum=1)
    if n_trials is not None:
        return n_trials
    if experiments_only:
        return len(experiments)
    if grid is not None:
        return math.prod(len(values) for values in grid.values())
    return None


# ---------------------------------------------------------------------------------------------
# Slot shapes


def _shape(table: _Table, pool: PoolSpec) -> Shape:
    value = table.get("slot")
    if value is None or value == "gpu":
        shape = Shape(gpus=1 / pool.trials_per_gpu, fallback_cpus=pool.threads_per_slot or 1)
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
    return Shape(gpus=float(shape.gpus), cpus=shape.cpus, fallback_cpus=shape.fallback_cpus)


def _shape_table(table: _Table, value: Mapping[str, Any]) -> Shape:
    for key in value:
        if key not in SLOT_KEYS:
            close = difflib.get_close_matches(key, SLOT_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            table.fail(
                "slot", f"unknown key {key!r}; {hint}a slot table takes {', '.join(SLOT_KEYS)}."
            )
    # Raw values: _shape has them checked by Shape.check.
    return Shape(
        gpus=value.get("gpus", 0.0),
        cpus=value.get("cpus"),
        fallback_cpus=value.get("fallback_cpus"),
    )


# ---------------------------------------------------------------------------------------------
# Matrix expansion


def _combinations(table: _Table) -> Iterator[dict[str, Any]]:
    """Each combination of the matrix, the first variable outermost; one empty one without."""
    matrix = _table_of_lists(table, "matrix", '{ dataset = ["iris", "wine"] }')
    if matrix is None:
        yield {}
        return
    for name, values in matrix.items():
        if not NAME_PATTERN.match(name):
            table.fail(
                "matrix",
                f"{name!r} cannot be a {{variable}}; use letters, digits and underscores.",
            )
        for value in values:
            if not isinstance(value, (str, int, float, bool)):
                table.fail("matrix", f"{name!r} holds {value!r}; use strings, numbers or booleans.")
    for combination in itertools.product(*matrix.values()):
        yield dict(zip(matrix, combination, strict=True))


def _expand(blueprint: _Blueprint, values: dict[str, Any], index: int) -> StudySpec:
    table = blueprint.table
    name = _name(blueprint, values)
    stage = _string(table, "stage", '"{dataset}"')
    cmd = _command(table, "cmd", blueprint.space, values)
    refit_cmd = _command(table, "refit_cmd", blueprint.space, values)
    return StudySpec(
        name=name,
        index=index,
        line=table.line(),
        target=blueprint.target,
        args=_args(table, values),
        cmd=cmd,
        space=blueprint.space_path,
        stage="" if stage is None else _fill(table, "stage", stage, values),
        refit_cmd=refit_cmd,
        matrix_values=dict(values),
        # Each study gets its own copies: the runner may change one study's tables.
        **copy.deepcopy(blueprint.settings),
    )


def _name(blueprint: _Blueprint, values: dict[str, Any]) -> str:
    table = blueprint.table
    given = _string(table, "name", '"xgb-{dataset}"')
    template = blueprint.base_name if given is None else given
    name = _fill(table, "name", template, values)
    has_placeholder = any(
        f is not None for _, f, _, _ in _parse_placeholders(table, "name", template)
    )
    if values and not has_placeholder:  # tell the combinations apart
        name = "-".join([name, *(str(value) for value in values.values())])
    if "/" in name or "\\" in name:
        table.fail("name", f"the study name {name!r} cannot hold a slash; it names a folder.")
    return name


def _args(table: _Table, values: dict[str, Any]) -> dict[str, Any] | None:
    args = table.get("args")
    if args is None:
        return None
    if not isinstance(args, Mapping):
        table.fail("args", 'must be a table of keyword arguments, e.g. { dataset = "iris" }.')
    filled = _fill_value(table, args, values)
    assert isinstance(filled, dict)
    return filled


def _fill_value(table: _Table, value: Any, values: dict[str, Any]) -> Any:
    """``value`` with the matrix filled into its strings; "{var}" alone keeps the value's type."""
    if isinstance(value, Mapping):
        return {key: _fill_value(table, item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill_value(table, item, values) for item in value]
    if isinstance(value, str):
        alone = re.fullmatch(r"\{(\w+)\}", value)
        if alone and alone.group(1) in values:
            return values[alone.group(1)]
        return _fill(table, "args", value, values)
    return value


def _fill(table: _Table, key: str, text: str, values: dict[str, Any]) -> str:
    """Fill matrix variables into a name, stage or argument; any other placeholder is a mistake."""
    pieces = []
    for literal, field, spec, conversion in _parse_placeholders(table, key, text):
        pieces.append(literal)
        if field is None:
            continue
        if field not in values:
            known = ", ".join(values) or "none: the study has no matrix"
            table.fail(
                key,
                f"{{{field}}} is not a matrix variable (matrix variables: {known}); add "
                f"{field} to the matrix, or write {{{{ and }}}} for literal braces.",
            )
        pieces.append(_format(table, key, values[field], spec, conversion))
    return "".join(pieces)


def _command(
    table: _Table, key: str, space: SearchSpace | None, values: dict[str, Any]
) -> str | None:
    """A command line with the matrix filled in; its other placeholders (parameters) stay."""
    text = _string(table, key, '"python train.py --lr {lr}"')
    if text is None:
        return None
    pieces = []
    for literal, field, spec, conversion in _parse_placeholders(table, key, text):
        pieces.append(_escape(literal))
        if field is None:
            continue
        if field in values:
            pieces.append(_escape(_format(table, key, values[field], spec, conversion)))
        else:
            suffix = (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            pieces.append(f"{{{field}{suffix}}}")
    command = "".join(pieces)
    if space is not None:
        try:
            check_template(split_command(command), space)
        except ConfigError as exc:
            table.fail(key, str(exc))
    return command


def _parse_placeholders(
    table: _Table, key: str, text: str
) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(text))
    except ValueError as exc:
        table.fail(
            key,
            f"{text!r} has a malformed placeholder ({exc}); write {{{{ and }}}} "
            "for literal braces.",
        )


def _format(table: _Table, key: str, value: Any, spec: str | None, conversion: str | None) -> str:
    try:
        converted = string.Formatter().convert_field(value, conversion) if conversion else value
        return format(converted, spec or "")
    except (ValueError, TypeError) as exc:
        table.fail(key, f"cannot format {value!r} with {spec!r} ({exc}); check the format spec.")


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
