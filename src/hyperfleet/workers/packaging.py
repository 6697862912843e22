"""Turning the user's objective into an :class:`ObjectiveSpec` a fresh worker can load.

Importable functions travel by reference and are imported in the worker, so their module's
top-level code (loading a data set) runs once per worker. Functions of the user's own script
(``__main__``) travel by reference too, and the worker re-runs the script's top level as
multiprocessing's spawn does. Lambdas and closures travel by value through cloudpickle.
"""

from __future__ import annotations

import ast
import importlib.util
import multiprocessing.spawn
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

from hyperfleet.errors import ObjectiveError
from hyperfleet.workers.protocol import ObjectiveSpec


def spec_from_callable(
    objective: Callable[..., Any], factory_kwargs: dict[str, Any] | None = None
) -> ObjectiveSpec:
    if not callable(objective):
        raise ObjectiveError(
            f"the objective must be callable, got a {type(objective).__name__}; pass a function "
            "that takes a trial and returns a value."
        )
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    interactive_main = getattr(objective, "__module__", None) == "__main__" and main_file is None
    payload = None if interactive_main else _pickle_by_reference(objective)
    if payload is None:
        payload = cloudpickle.dumps(objective)
    return ObjectiveSpec(
        kind="pickle",
        name=getattr(objective, "__qualname__", type(objective).__name__),
        payload=payload,
        main_preparation=_preparation(needs_main=b"__main__" in payload and bool(main_file)),
        factory_kwargs=factory_kwargs,
    )


def _pickle_by_reference(objective: Callable[..., Any]) -> bytes | None:
    try:
        return pickle.dumps(objective)
    except Exception:  # lambdas, closures, bound methods of local classes
        return None


def _preparation(needs_main: bool) -> dict[str, Any]:
    """What spawn would hand a child: sys.path, working directory and, if needed, __main__."""
    data = multiprocessing.spawn.get_preparation_data("hyperfleet-worker")
    data.pop("authkey", None)  # not picklable, and workers never use it
    if not needs_main:
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


def spec_from_target(target: str, factory_kwargs: dict[str, Any] | None = None) -> ObjectiveSpec:
    """``train.py:objective`` or ``package.module:objective``, checked without running it."""
    location, sep, name = target.rpartition(":")
    if not sep or not location or not name:
        raise ObjectiveError(
            f"cannot read objective {target!r}; write FILE.py:FUNCTION or MODULE:FUNCTION, "
            "for example train.py:objective."
        )
    if location.endswith(".py") or "/" in location:
        path = Path(location)
        check_file_defines(path, name)
        return ObjectiveSpec(
            kind="file",
            name=name,
            location=str(path.resolve()),
            main_preparation=_preparation(needs_main=False),
            factory_kwargs=factory_kwargs,
        )
    _search_working_directory()
    if importlib.util.find_spec(location) is None:
        raise ObjectiveError(
            f"module {location!r} cannot be found; check the name, or run from the folder that "
            "holds it, or give a file path such as train.py:objective."
        )
    return ObjectiveSpec(
        kind="module",
        name=name,
        location=location,
        main_preparation=_preparation(needs_main=False),
        factory_kwargs=factory_kwargs,
    )


def _search_working_directory() -> None:
    # As ``python -m`` does: MODULE:FUNCTION is found from the working directory, which the
    # ``hyperfleet`` console script leaves off sys.path. Workers get this sys.path too.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def check_file_defines(path: Path, name: str) -> None:
    """The file exists, parses, and defines ``name`` at top level; it is not run here."""
    if not path.is_file():
        raise ObjectiveError(f"objective file {path} does not exist; check the path.")
    source = path.read_text()
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        line = (exc.text or "").rstrip()
        raise ObjectiveError(
            f"{path}:{exc.lineno}: syntax error: {exc.msg}\n    {line}\nFix the file and run again."
        ) from None
    defined = top_level_names(tree)
    if name not in defined:
        have = ", ".join(sorted(defined)) or "none"
        raise ObjectiveError(
            f"{path} defines no {name!r}; the functions and callables it defines are: {have}. "
            f"Write {path}:NAME with one of them."
        )


def top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names
