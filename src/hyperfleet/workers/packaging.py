"""Turning the user's objective into an :class:`ObjectiveSpec` a fresh worker can load.

Importable functions travel by reference and are imported in the worker, so their module's
top-level code (loading a data set) runs once per worker. Functions of the user's own script
(``__main__``) travel by reference too, and the worker re-runs the script's top level as
multiprocessing's spawn does. Lambdas and closures travel by value through cloudpickle.

What a fresh interpreter cannot import by name travels otherwise: a module loaded from its file
under another name (``importlib.util.spec_from_file_location``) as that file, imported in the
worker under the same name; a module with no file (a script piped on stdin, code typed at a
prompt or in a notebook, a module built in memory) by value.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import io
import multiprocessing.spawn
import os
import pickle
import sys
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
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
    rerun_main = _main_can_be_rerun()
    try:
        payload, module_files = _pickle_for_workers(objective, rerun_main)
    except Exception as exc:  # a lock, a queue, an open file or socket somewhere inside it
        raise ObjectiveError(
            _cannot_send("the objective", objective, exc, _MAKE_IT_THERE, cloudpickle.dumps)
        ) from None
    _check_kwargs_can_be_sent(factory_kwargs)
    return ObjectiveSpec(
        kind="pickle",
        name=getattr(objective, "__qualname__", type(objective).__name__),
        payload=payload,
        module_files=module_files,
        main_preparation=_preparation(needs_main=rerun_main and b"__main__" in payload),
        factory_kwargs=factory_kwargs,
    )


# How deep the search for what cannot be pickled goes (self._queue.mutex is three steps).
_SEARCH_DEPTH = 6
_MAKE_IT_THERE = (
    "make it where it is used instead: inside the objective, or once per worker in a factory "
    "that returns the objective (hyperfleet.optimize(study, make_objective, "
    "objective_kwargs={...}))"
)
_MAKE_IT_IN_THE_FACTORY = (
    "pass what the factory needs to make it (a path, a size, a name) and make it in the "
    "factory, once per worker"
)


def _check_kwargs_can_be_sent(kwargs: dict[str, Any] | None) -> None:
    """The factory's arguments travel to each worker with pickle, as they are."""
    for name, value in (kwargs or {}).items():
        try:
            pickle.dumps(value)
        except Exception as exc:
            what = f"objective_kwargs[{name!r}]"
            fix = _MAKE_IT_IN_THE_FACTORY
            raise ObjectiveError(_cannot_send(what, value, exc, fix, pickle.dumps)) from None


def _cannot_send(
    what: str, value: Any, exc: Exception, fix: str, dumps: Callable[[Any], bytes]
) -> str:
    """One line: which part of ``value`` cannot be pickled (by ``dumps``, which refused it
    with ``exc``), and ``fix``, how to do without sending it."""
    chain = _unpicklable_chain(value, dumps)
    error = f"{type(exc).__name__}: {exc}"
    if not chain:
        return f"{what} cannot be sent to the workers ({error}); {fix}."
    # The part the user made (self._gpu_queue), and what inside it pickle refuses (its lock).
    named, part = chain[0] if chain[0][0] != "self" or len(chain) == 1 else _joined(chain[:2])
    leaf = chain[-1][1]
    inside = f", which holds a {_type_name(leaf)}" if leaf is not part else ""
    return (
        f"{what} cannot be sent to the workers: {named} (a {_type_name(part)}{inside}) cannot "
        f"be pickled ({error}); {fix}."
    )


def _joined(chain: list[tuple[str, Any]]) -> tuple[str, Any]:
    return "".join(name for name, _ in chain), chain[-1][1]


def _type_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _unpicklable_chain(
    value: Any, dumps: Callable[[Any], bytes], depth: int = 0
) -> list[tuple[str, Any]]:
    """The path to the innermost part of ``value`` that cannot be pickled, as (step, part)
    pairs (``self``, ``._gpu_queue``, ``.mutex``); empty when no part alone fails."""
    if depth >= _SEARCH_DEPTH:
        return []
    for step, part in _parts(value):
        try:
            dumps(part)
        except Exception:
            return [(step, part), *_unpicklable_chain(part, dumps, depth + 1)]
    return []


def _parts(value: Any) -> list[tuple[str, Any]]:
    """What pickling ``value`` pickles in turn, each with the step that names it."""
    if isinstance(value, MethodType):
        return [("self", value.__self__)]
    if isinstance(value, FunctionType):
        cells = zip(value.__code__.co_freevars, value.__closure__ or (), strict=False)
        closure = [(name, cell.cell_contents) for name, cell in cells if _has_contents(cell)]
        used = value.__code__.co_names
        return closure + [
            (name, value.__globals__[name]) for name in used if name in value.__globals__
        ]
    if isinstance(value, functools.partial):
        return (
            [(".func", value.func)]
            + [(f".args[{i}]", a) for i, a in enumerate(value.args)]
            + [(f".keywords[{k!r}]", v) for k, v in value.keywords.items()]
        )
    if isinstance(value, dict):
        return [(f"[{key!r}]", item) for key, item in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [(f"[{index}]", item) for index, item in enumerate(value)]
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and not isinstance(value, (type, ModuleType)):
        return [(f".{name}", item) for name, item in attributes.items()]
    return []


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def _main_can_be_rerun() -> bool:
    """Whether a worker can re-run the user's script as spawn does: it was started from a real
    file or with ``python -m``, not typed in, piped on stdin or run in a notebook."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    return _real_file(main) is not None


def _pickle_for_workers(
    objective: Callable[..., Any], rerun_main: bool
) -> tuple[bytes, dict[str, str]]:
    """The pickled objective, and the files of the modules it names that a fresh interpreter
    could not import by name (the worker imports them under that name before unpickling).

    By reference when pickle can, else with cloudpickle. A module that cannot be imported by
    name and has no file (``__main__`` piped on stdin, a module built in memory) is pickled by
    value instead, as are the globals of its functions.
    """
    payload, named = _pickle_by_reference(objective) or _cloudpickle(objective, [])
    by_value: list[ModuleType] = []
    while True:
        missing = {
            name: module
            for name in named
            if isinstance(module := sys.modules.get(name), ModuleType)
            and not _importable_by_name(name, rerun_main)
        }
        without_file = [m for m in missing.values() if _real_file(m) is None and m not in by_value]
        if not without_file:
            return payload, _files_in_import_order(missing)
        by_value += without_file
        payload, named = _cloudpickle(objective, by_value)


def _pickle_by_reference(objective: Callable[..., Any]) -> tuple[bytes, set[str]] | None:
    buffer = io.BytesIO()
    pickler = _NotingPickler(buffer)
    try:
        pickler.dump(objective)
    except Exception:  # lambdas, closures, bound methods of local classes
        return None
    return buffer.getvalue(), pickler.modules


def _cloudpickle(
    objective: Callable[..., Any], by_value: list[ModuleType]
) -> tuple[bytes, set[str]]:
    registered = cloudpickle.list_registry_pickle_by_value()
    # cloudpickle registers a module by its __name__, which must name it in sys.modules.
    added = [
        m for m in by_value if m.__name__ not in registered and sys.modules.get(m.__name__) is m
    ]
    for module in added:
        cloudpickle.register_pickle_by_value(module)
    buffer = io.BytesIO()
    pickler = _NotingCloudPickler(buffer)
    try:
        pickler.dump(objective)
    finally:
        for module in added:
            cloudpickle.unregister_pickle_by_value(module)
    return buffer.getvalue(), pickler.modules


class _NotingPickler(pickle.Pickler):
    """Notes the modules of the functions and classes it pickles (pickle names them all)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        _note_module(self.modules, obj)
        return NotImplemented


class _NotingCloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """Notes the modules cloudpickle names: those of the functions and classes it leaves to
    pickle by reference, and modules a function pickled by value uses as globals."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        if reduced is NotImplemented:
            _note_module(self.modules, obj)
        return reduced


def _note_module(modules: set[str], obj: Any) -> None:
    # Called for every object but numbers, strings and built-in containers: cheap even for a
    # closure that captures a large list.
    if isinstance(obj, ModuleType):
        modules.add(obj.__name__)
    elif isinstance(obj, (type, FunctionType, BuiltinFunctionType)):
        module = getattr(obj, "__module__", None)
        if isinstance(module, str):
            modules.add(module)


def _importable_by_name(name: str, rerun_main: bool) -> bool:
    """Whether a fresh interpreter with this sys.path imports ``name`` as the module loaded
    here: found by the import system (not only registered in sys.modules, as a module loaded
    with ``importlib.util.spec_from_file_location`` is) and from the same file."""
    if name == "__main__":
        return rerun_main
    if name.partition(".")[0] in sys.stdlib_module_names:
        return True
    parent, _, _ = name.rpartition(".")
    search_path = None
    if parent:
        search_path = getattr(sys.modules.get(parent), "__path__", None)
        if search_path is None or not _importable_by_name(parent, rerun_main):
            return False
    found = _find_spec_without_sys_modules(name, search_path)
    if found is None:
        return False
    return _same_file(found.origin, getattr(sys.modules.get(name), "__file__", None))


def _find_spec_without_sys_modules(name: str, search_path: Any) -> ModuleSpec | None:
    # importlib.util.find_spec answers from sys.modules first, so it would find any module
    # already loaded, however it was loaded; ask the finders themselves.
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            found = find_spec(name, search_path)
        except Exception:  # a third-party finder's own trouble means "not found by it"
            continue
        if found is not None:
            return found  # type: ignore[no-any-return]
    return None


def _same_file(origin: str | None, file: str | None) -> bool:
    if not origin or not file or not os.path.isfile(origin) or not os.path.isfile(file):
        return True  # built-in, frozen or namespace modules: nothing to compare
    return os.path.samefile(origin, file)


def _real_file(module: object) -> str | None:
    file = getattr(module, "__file__", None)
    return os.path.abspath(file) if isinstance(file, str) and os.path.isfile(file) else None


def _files_in_import_order(modules: dict[str, ModuleType]) -> dict[str, str]:
    # A module may use another one that was loaded before it, as it did here.
    position = {name: index for index, name in enumerate(sys.modules)}
    files = {name: _real_file(module) for name, module in modules.items()}
    ordered = sorted(files, key=lambda name: position.get(name, 0))
    return {name: file for name in ordered if (file := files[name]) is not None}


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


def check_target_parameters(spec: ObjectiveSpec, target: str) -> None:
    """The parameters of a command-line TARGET fit how workers will call it: with the trial
    alone, or, given ``--objective-arg``, as a factory with those keyword arguments.

    Read from the source, never run, so a mistake stops the run before anything is written.
    Only plain functions are checked: a decorator may change what a function takes, and
    classes and other callables are left to the run.
    """
    source = _source_file(spec)
    function = _plain_function(source, spec.name) if source is not None else None
    if function is None:
        return
    if spec.factory_kwargs is None:
        _check_takes_a_trial(function, target)
    else:
        _check_takes_keywords(function, target, spec.factory_kwargs)


def _source_file(spec: ObjectiveSpec) -> Path | None:
    if spec.kind == "file":
        return Path(spec.location)
    found = importlib.util.find_spec(spec.location) if spec.kind == "module" else None
    origin = found.origin if found is not None else None
    return Path(origin) if origin and origin.endswith(".py") and os.path.isfile(origin) else None


def _plain_function(source: Path, name: str) -> ast.FunctionDef | None:
    """The top-level ``def name`` without decorators that the module ends up with, if any."""
    binding: ast.stmt | None = None
    for node in ast.parse(source.read_text(), filename=str(source)).body:
        if name in _names_bound_by(node):
            binding = node
    if isinstance(binding, ast.FunctionDef) and not binding.decorator_list:
        return binding
    return None


def _names_bound_by(node: ast.stmt) -> set[str]:
    return top_level_names(ast.Module(body=[node], type_ignores=[]))


def _check_takes_a_trial(function: ast.FunctionDef, target: str) -> None:
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    if not positional and args.vararg is None and not args.kwonlyargs:
        location = target.rpartition(":")[0]
        raise ObjectiveError(
            f"{target} takes no arguments, but an objective takes the trial. If it returns the "
            f"objective, assign that at the top of {location} (objective = {function.name}()) "
            f"and run {location}:objective."
        )
    if not positional and args.vararg is None:
        names = ", ".join(a.arg for a in args.kwonlyargs)
        raise ObjectiveError(
            f"{target} takes only keyword arguments ({names}), but an objective takes the trial. "
            "If it makes the objective, pass them with --objective-arg NAME=VALUE."
        )
    required = _required_parameters(function)
    keyword_only = {a.arg for a in args.kwonlyargs}
    if len(required) > 1 or keyword_only.intersection(required):
        raise ObjectiveError(
            f"{target} needs {len(required)} arguments ({', '.join(required)}), but an objective "
            "takes one, the trial. If it makes the objective, pass them with --objective-arg "
            "NAME=VALUE, one flag each."
        )


def _check_takes_keywords(function: ast.FunctionDef, target: str, kwargs: dict[str, Any]) -> None:
    args = function.args
    by_keyword = [a.arg for a in (*args.args, *args.kwonlyargs)]
    unknown = [name for name in kwargs if name not in by_keyword]
    if unknown and args.kwarg is None:
        raise ObjectiveError(
            f"{target} has no parameter {unknown[0]!r} (it takes: {', '.join(by_keyword) or 'none'}"
            f"); fix the name given with --objective-arg {unknown[0]}=VALUE."
        )
    missing = [name for name in _required_parameters(function) if name not in kwargs]
    if missing:
        raise ObjectiveError(
            f"{target} also needs {', '.join(missing)}; add --objective-arg {missing[0]}=VALUE."
        )


def _required_parameters(function: ast.FunctionDef) -> list[str]:
    """The parameters without a default value, in order."""
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    without_default = positional[: len(positional) - len(args.defaults)]
    defaults = zip(args.kwonlyargs, args.kw_defaults, strict=True)
    keyword_only = [a for a, default in defaults if default is None]
    return [a.arg for a in (*without_default, *keyword_only)]


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
