"""A search space declared in a TOML file, for objectives that are commands (``--space``).

Each parameter is a table ``[params.NAME]``; parameters are suggested in file order::

    [params.lr]
    type = "float"          # "float", "int" or "categorical"
    low = 1e-5
    high = 1e-1
    log = true              # sample on a log scale (low must be > 0)

    [params.layers]
    type = "int"
    low = 1
    high = 8
    step = 1                # optional grid step (not together with log)

    [params.optimizer]
    type = "categorical"
    choices = ["sgd", "adam"]

    [params.momentum]       # exists only in trials where optimizer is "sgd"
    type = "float"
    low = 0.0
    high = 0.99
    when = { optimizer = "sgd" }

Keys:

``type``
    ``"float"``, ``"int"`` or ``"categorical"``; required.
``low``, ``high``
    The inclusive range of a float or int parameter; required for those, ``low <= high``.
    Int parameters need whole numbers.
``log``
    ``true`` samples on a log scale; needs ``low > 0`` (``low >= 1`` for ints) and no ``step``.
``step``
    The grid of a float or int parameter (``low``, ``low + step``, ...); must be positive.
``choices``
    The values of a categorical parameter: a non-empty list of strings, numbers or booleans.
``when``
    A table of conditions on *earlier* parameters: this parameter exists only in trials where
    every named parameter has the given value, or one of the values when a list is given
    (``when = { optimizer = ["sgd", "rmsprop"] }``). A condition on a parameter that is itself
    absent from a trial is false.

Names are letters, digits and underscores, not starting with a digit, so that they can be used
as ``{NAME}`` placeholders in a command. Any mistake raises :class:`hyperfleet.errors.ConfigError`
naming the parameter and the key.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from hyperfleet.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (exercised on Python 3.10 only)
    import tomli as tomllib  # type: ignore[import-not-found]

TYPES = ("float", "int", "categorical")
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Placeholders a command may use besides its parameters; no parameter may take these names.
RESERVED_NAMES = frozenset({"params_json", "trial_number", "launch_dir"})

_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}

Choice = str | int | float | bool
Conditions = tuple[tuple[str, tuple[Choice, ...]], ...]


@dataclass(frozen=True)
class Param:
    """One parameter of the space; ``when`` pairs an earlier parameter with its allowed values."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Choice, ...] = ()
    when: Conditions = ()

    def is_active(self, values: Mapping[str, Any]) -> bool:
        return all(name in values and values[name] in allowed for name, allowed in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            assert isinstance(self.low, int) and isinstance(self.high, int)
            int_step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.name, self.low, self.high, step=int_step, log=self.log)
        assert self.low is not None and self.high is not None
        float_step = float(self.step) if self.step is not None else None
        return trial.suggest_float(
            self.name, float(self.low), float(self.high), step=float_step, log=self.log
        )

    def admits(self, value: Any) -> bool:
        """Whether a trial could give this parameter ``value`` (for checking ``when``)."""
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def conditional_names(self) -> set[str]:
        return {p.name for p in self.params if p.when}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ask the trial for every parameter active in it, in declaration order."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.is_active(values):
                values[param.name] = param.suggest(trial)
        return values


def load_space(path: str | Path) -> SearchSpace:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the search space file {file} ({exc.strerror}); check the path "
            "given to --space."
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}. Fix the file and run again.") from None
    return parse_space(data, source=str(file))


def parse_space(data: Mapping[str, Any], source: str = "the search space") -> SearchSpace:
    """Validate parsed TOML (or an equivalent dict) into a :class:`SearchSpace`."""
    extra = set(data) - {"params"}
    if extra:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(extra)}; declare each parameter as a "
            "table [params.NAME]."
        )
    tables = data.get("params")
    if not isinstance(tables, Mapping) or not tables:
        raise ConfigError(
            f"{source} declares no parameters; add at least one table such as\n"
            '[params.lr]\ntype = "float"\nlow = 0.0001\nhigh = 0.1'
        )
    params: list[Param] = []
    for name, table in tables.items():
        params.append(_parse_param(source, str(name), table, params))
    return SearchSpace(tuple(params))


def _parse_param(source: str, name: str, table: Any, earlier: Sequence[Param]) -> Param:
    where = f"{source}: parameter {name!r}"
    _check_name(where, name)
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table [params.{name}] with a type and its keys.")
    kind = table.get("type")
    if kind not in TYPES:
        raise ConfigError(
            f"{where}: type is {kind!r}; set type to one of {', '.join(map(repr, TYPES))}."
        )
    unknown = set(table) - _KEYS[kind]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)} for a {kind} parameter; "
            f"the keys it takes are {sorted(_KEYS[kind])}."
        )
    when = _parse_when(where, table.get("when"), earlier)
    if kind == "categorical":
        return Param(name, kind, choices=_parse_choices(where, table.get("choices")), when=when)
    return _parse_numeric(where, name, kind, table, when)


def _check_name(where: str, name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ConfigError(
            f"{where}: use only letters, digits and underscores in a parameter name (not "
            "starting with a digit), so that it works as a {NAME} placeholder in a command."
        )
    if name in RESERVED_NAMES:
        raise ConfigError(
            f"{where}: {name!r} is reserved for a command placeholder; rename the parameter."
        )


def _parse_choices(where: str, choices: Any) -> tuple[Choice, ...]:
    if not isinstance(choices, list) or not choices:
        raise ConfigError(
            f'{where}: choices must be a non-empty list, for example choices = ["sgd", "adam"].'
        )
    for choice in choices:
        if not isinstance(choice, (str, int, float, bool)):
            raise ConfigError(
                f"{where}: choice {choice!r} is a {type(choice).__name__}; choices must be "
                "strings, numbers or booleans."
            )
    return tuple(choices)


def _parse_numeric(
    where: str, name: str, kind: str, table: Mapping[str, Any], when: Conditions
) -> Param:
    low = _number(where, kind, "low", table.get("low"))
    high = _number(where, kind, "high", table.get("high"))
    if low > high:
        raise ConfigError(f"{where}: low ({low}) is greater than high ({high}); swap them.")
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, not {log!r}.")
    step = table.get("step")
    if step is not None:
        step = _number(where, kind, "step", step)
        if step <= 0:
            raise ConfigError(f"{where}: step must be positive, not {step}.")
        if log:
            raise ConfigError(f"{where}: log and step cannot be used together; remove one.")
    if log and (low < 1 if kind == "int" else low <= 0):
        smallest = "1" if kind == "int" else "a positive number"
        raise ConfigError(f"{where}: a log scale needs low to be at least {smallest}, not {low}.")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when)


def _number(where: str, kind: str, key: str, value: Any) -> int | float:
    if value is None:
        raise ConfigError(f"{where}: {key} is missing; a {kind} parameter needs low and high.")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be a whole number, not {value!r}.")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, not {value!r}.")
    return float(value)


def _parse_when(where: str, when: Any, earlier: Sequence[Param]) -> Conditions:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise ConfigError(
            f"{where}: when must be a table of earlier parameters and their values, "
            'for example when = { optimizer = "sgd" }.'
        )
    by_name = {p.name: p for p in earlier}
    conditions = []
    for other, wanted in when.items():
        if other not in by_name:
            known = ", ".join(by_name) or "none"
            raise ConfigError(
                f"{where}: when refers to {other!r}, which is not declared before it (earlier "
                f"parameters: {known}); conditions may only use parameters declared above."
            )
        allowed = tuple(wanted) if isinstance(wanted, list) else (wanted,)
        for value in allowed:
            if not by_name[other].admits(value):
                raise ConfigError(
                    f"{where}: when asks for {other} = {value!r}, a value {other!r} can never "
                    "take; use one of its choices or a number within its range."
                )
        conditions.append((str(other), allowed))
    return tuple(conditions)
