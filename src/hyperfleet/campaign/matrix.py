"""Matrix expansion: one study per combination, with the values filled into its placeholders.

The names, ``args``, ``cmd``, ``stage`` and ``refit_cmd`` of a ``[[study]]`` may hold
``{variable}`` placeholders of its matrix; a command's other placeholders are the trial's
parameters and stay for the runner to fill.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any

from hyperfleet.campaign.source import Table, string, table_of_lists
from hyperfleet.campaign.spec import StudySpec
from hyperfleet.errors import ConfigError
from hyperfleet.objective.command import check_template, split_command
from hyperfleet.sampling.space import NAME_PATTERN, SearchSpace


@dataclass(frozen=True)
class Blueprint:
    """What a [[study]] table says before its matrix is expanded; checked once per table."""

    table: Table
    base_name: str  # the default name: the objective's or the command's stem
    target: str | None
    space: SearchSpace | None
    space_path: Path | None
    settings: dict[str, Any]  # the StudySpec fields that no matrix value changes


def combinations(table: Table) -> Iterator[dict[str, Any]]:
    """Each combination of the matrix, the first variable outermost; one empty one without."""
    matrix = table_of_lists(table, "matrix", '{ dataset = ["iris", "wine"] }')
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


def expand(blueprint: Blueprint, values: dict[str, Any], index: int) -> StudySpec:
    table = blueprint.table
    template = _name_template(blueprint)
    name = _name(blueprint, template, values)
    stage = string(table, "stage", '"{dataset}"')
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
        family=template,
        # Each study gets its own copies: the runner may change one study's tables.
        **copy.deepcopy(blueprint.settings),
    )


def _name_template(blueprint: Blueprint) -> str:
    """The ``[[study]]``'s name before expansion ("xgb-{dataset}"), by default the base name."""
    given = string(blueprint.table, "name", '"xgb-{dataset}"')
    return given or blueprint.base_name


def _name(blueprint: Blueprint, template: str, values: dict[str, Any]) -> str:
    table = blueprint.table
    name = _fill(table, "name", template, values)
    has_placeholder = any(
        f is not None for _, f, _, _ in _parse_placeholders(table, "name", template)
    )
    if values and not has_placeholder:  # tell the combinations apart
        name = "-".join([name, *(str(value) for value in values.values())])
    if "/" in name or "\\" in name:
        table.fail("name", f"the study name {name!r} cannot hold a slash; it names a folder.")
    return name


def _args(table: Table, values: dict[str, Any]) -> dict[str, Any] | None:
    args = table.get("args")
    if args is None:
        return None
    if not isinstance(args, Mapping):
        table.fail("args", 'must be a table of keyword arguments, e.g. { dataset = "iris" }.')
    filled = _fill_value(table, args, values)
    assert isinstance(filled, dict)
    return filled


def _fill_value(table: Table, value: Any, values: dict[str, Any]) -> Any:
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


def _fill(table: Table, key: str, text: str, values: dict[str, Any]) -> str:
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
    table: Table, key: str, space: SearchSpace | None, values: dict[str, Any]
) -> str | None:
    """A command line with the matrix filled in; its other placeholders (parameters) stay."""
    text = string(table, key, '"python train.py --lr {lr}"')
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
    table: Table, key: str, text: str
) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(Formatter().parse(text))
    except ValueError as exc:
        table.fail(
            key,
            f"{text!r} has a malformed placeholder ({exc}); write {{{{ and }}}} "
            "for literal braces.",
        )


def _format(table: Table, key: str, value: Any, spec: str | None, conversion: str | None) -> str:
    try:
        converted = Formatter().convert_field(value, conversion) if conversion else value
        return format(converted, spec or "")
    except (ValueError, TypeError) as exc:
        table.fail(key, f"cannot format {value!r} with {spec!r} ({exc}); check the format spec.")


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
