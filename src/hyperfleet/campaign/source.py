"""Reading a campaign file: its TOML, the line of each table and key, and typed values."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hyperfleet.config import parse_duration
from hyperfleet.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (exercised on Python 3.10 only)
    import tomli as tomllib  # type: ignore[import-not-found]

_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
# A table header: [pool], [[study]], [study.slot], ["quoted"]; no commas, unlike an array line.
_HEADER = re.compile(r"""^\s*\[\[?([\w\-."' ]+)\]\]?\s*(?:#.*)?$""")


def read(file: Path) -> str:
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


def parse_toml(source: Source, text: str) -> dict[str, Any]:
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


class Source:
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
class Table:
    """One table of the file, able to say where each of its keys is when a value is wrong."""

    source: Source
    name: str  # "campaign", "pool", "defaults", "study"; "" for the top level
    occurrence: int  # which [[study]], 0-based
    label: str  # how messages name it: "[pool]", "[[study]] #2 'xgb'"
    data: Mapping[str, Any]
    # For a study: the [defaults] keys it inherits (those it does not set itself).
    inherited: Table | None = None

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
        at = f"{self.source.file}:{self.line(key)}" if self.source.lines else self.source.file
        raise ConfigError(f"{at}: {where}: {problem}")


def top_table(
    source: Source, document: Mapping[str, Any], name: str, keys: tuple[str, ...]
) -> Table:
    data = document.get(name, {})
    table = Table(source, name, 0, f"[{name}]", data if isinstance(data, Mapping) else {})
    if not isinstance(data, Mapping):
        top = Table(source, "", 0, "the file", document)
        top.fail(name, f"must be a table; write a [{name}] header with its keys below it.")
    check_keys(table, keys, "key")
    return table


def check_keys(table: Table, known: Iterable[str], what: str) -> None:
    known = tuple(known)
    for key in table.data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            table.fail(key, f"unknown {what}; {hint}the {what}s allowed are {', '.join(known)}.")


# ---------------------------------------------------------------------------------------------
# Typed values (None when absent)


def string(table: Table, key: str, example: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        table.fail(
            key, f"must be a non-empty string, not {value!r}; for example {key} = {example}."
        )
    return value


def integer(table: Table, key: str, minimum: int | None = None) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        table.fail(key, f"must be a whole number, not {value!r}.")
    if minimum is not None and value < minimum:
        table.fail(key, f"must be at least {minimum}, not {value}; set {key} = {minimum} or more.")
    return value


def boolean(table: Table, key: str) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        table.fail(key, f"must be true or false, not {value!r}.")
    return value


def duration(table: Table, key: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        table.fail(key, f'must be seconds or a duration such as "30m", not {value!r}.')
    try:
        return parse_duration(value, what=key)
    except ConfigError as exc:
        table.fail(key, str(exc))


def choice(table: Table, key: str, choices: Iterable[str], default: str) -> str:
    choices = tuple(choices)
    value = table.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or value.lower() not in choices:
        close = difflib.get_close_matches(str(value).lower(), choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        table.fail(key, f"{value!r} is not one of {', '.join(choices)}; {hint}pick one of them.")
    return value.lower()


def table_of_lists(table: Table, key: str, example: str) -> dict[str, list[Any]] | None:
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
