"""The names of a campaign that become folders, checked before anything runs.

A study's folder is ``studies/<name>/`` and a named experiment's (or grid point's) link is
``studies/<name>/experiments/<name>``, with every character other than letters, digits and
``.=+-_`` replaced by ``_`` (see :func:`hyperfleet.store.rundir.folder_name`). So a name must
not map to ``.``, ``..`` or a name too long for a folder, and two names must not map to the same
folder (``"lr 0.1"``, ``"lr_0.1"`` and ``"lr/0.1"`` all become ``lr_0.1``): each would overwrite
the other's trials, ``best/`` and links. Such names are refused with a ConfigError naming both.
"""

from __future__ import annotations

import itertools
from typing import Any

from hyperfleet.campaign.source import Table
from hyperfleet.campaign.spec import Experiment
from hyperfleet.errors import ConfigError
from hyperfleet.store.rundir import check_folder_name, folder_name

MAPPING = "characters other than letters, digits and .=+-_ become _"


def grid_points(grid: dict[str, list[Any]] | None) -> list[Experiment]:
    """Every point of the grid as a named experiment ("depth=3,eta=0.1"), in order."""
    if not grid:
        return []
    names = list(grid)
    return [
        Experiment(
            ",".join(f"{n}={v}" for n, v in zip(names, values, strict=True)),
            dict(zip(names, values, strict=True)),
        )
        for values in itertools.product(*(grid[n] for n in names))
    ]


def check_study_folder(seen: dict[str, str], name: str, table: Table) -> None:
    """A study's ``studies/<name>`` folder: a valid folder name, and no other study's."""
    folder = folder_name(name)
    try:
        check_folder_name(folder, "study name", "shorten it.")
    except ConfigError as exc:
        table.fail("name", str(exc))
    other = seen.get(folder)
    if other is not None:
        table.fail(
            "name",
            f"the studies {other!r} and {name!r} would share the folder studies/{folder} "
            f"({MAPPING}); rename one so that the names differ in letters or digits.",
        )
    seen[folder] = name


def check_experiment_folders(
    table: Table, experiments: tuple[Experiment, ...], grid: dict[str, list[Any]] | None
) -> None:
    """Each named experiment and grid point links ``experiments/<name>``: a valid folder name,
    and no other's."""
    seen: dict[str, str] = {}
    named = [("experiment", e.name, "experiments", "rename it.") for e in experiments]
    fix = "use shorter parameter names or values."
    points = [("grid point", p.name, "grid", fix) for p in grid_points(grid)]
    for what, name, key, fix in [*named, *points]:
        folder = folder_name(name)
        try:
            check_folder_name(folder, f"{what} name", fix)
        except ConfigError as exc:
            table.fail(key, str(exc))
        label = f"{what} {name!r}"
        other = seen.get(folder)
        if other is not None:
            table.fail(
                key,
                f"the {other} and the {label} would share the folder experiments/{folder} "
                f"({MAPPING}); make them differ in letters or digits.",
            )
        seen[folder] = label
