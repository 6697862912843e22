"""Refit once, cached: after a completed search, run a refit with the best parameters.

A refit is a function ``refit(params: dict) -> Any`` (``--refit train.py:refit``, or
``hyperfleet.optimize(..., refit=fn)``) or a command line whose ``{name}`` placeholders are
filled in like ``--cmd``'s (``--refit-cmd "python train.py --lr {lr} --save model.pt"``).
In a campaign, a refit function that takes an ``args`` parameter (``refit(params, args)``, or
``**kwargs``) also gets the study's ``args`` and matrix values as a dict (``{"dataset":
"wine"}``), so one function refits every study of a matrix; one that does not is called with
the parameters alone. A campaign's objective study may have a ``refit_cmd`` too: its
placeholders are then checked against the best trial's parameters when the refit runs.

When it runs
    Once, after a search that ended "completed" (never after a stopped or failed one), in a
    fresh process started with the environment of the first slot (its GPUs, cores and thread
    limits), with its working directory ``RUN_DIR/best/refit/`` and its output in ``stdout.log``
    and ``stderr.log`` there. The process also finds the parameters as JSON in
    ``HYPERFLEET_PARAMS`` and the best trial's number in ``HYPERFLEET_TRIAL_NUMBER``.

What it leaves
    ``best/refit/result.json``: the parameters, the trial number, the finish time and the
    returned value (``value`` when it is JSON, else its ``repr`` as ``value_repr``).
    ``best/refit/refit.json`` is the cache: the parameters, the refit's target and the files
    the refit left. The next run skips the refit when the first two are unchanged and every one
    of those files is still there, unless forced (``--force-refit``). ``best/`` is
    rebuilt when the best trial changes; ``refit/`` is carried over only while the best
    parameters stay the same (see :func:`hyperfleet.report.best.write_best`), so a refit folder
    always belongs to the best parameters.

A refit that raises or exits non-zero fails the run (exit status 1) with its reason in one
line, and caches nothing; in a campaign, the other studies' refits still run, and every line
about a refit names its study. A study with several objectives has no single best trial: its refit
is skipped with a one-line note (refit a Pareto trial from ``best/trial-N/params.json``).

The child side is ``python -m hyperfleet.objective.refit``: it reads a pickled :class:`RefitRequest`
from stdin.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperfleet.errors import ConfigError, ObjectiveError
from hyperfleet.store.rundir import write_json
from hyperfleet.workers.protocol import ObjectiveSpec

if TYPE_CHECKING:
    import optuna

    from hyperfleet.objective.command import CommandObjective

RESULT_NAME = "result.json"
CACHE_NAME = "refit.json"
FAILURE_NAME = ".failure.json"  # the child's reason for failing, read and removed by the parent
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
STDERR_TAIL_CHARS = 600


@dataclass(frozen=True)
class RefitPlan:
    """What to refit: ``spec`` loads the refit function, ``target`` names it in the cache."""

    spec: ObjectiveSpec
    target: str
    force: bool = False
    args: dict[str, Any] | None = None  # a campaign study's args and matrix values
    study: str = ""  # a campaign study's name, which its refit's lines start with


@dataclass(frozen=True)
class RefitRequest:
    """What the refit process is sent: the function, the parameters and where to work."""

    spec: ObjectiveSpec
    params: dict[str, Any]
    trial_number: int
    folder: str
    args: dict[str, Any] | None = None


# ----- building a plan, checked before anything runs ----------------------------------------


def plan_from_target(target: str, force: bool = False) -> RefitPlan:
    """``train.py:refit`` or ``package.module:refit``, checked like an objective target."""
    from hyperfleet.workers.packaging import spec_from_target

    try:
        spec = spec_from_target(target)
    except ObjectiveError as exc:
        raise ObjectiveError(f"--refit {target}: {exc}") from None
    return RefitPlan(spec, target, force)


def plan_from_callable(refit: Callable[[dict[str, Any]], Any], force: bool = False) -> RefitPlan:
    from hyperfleet.workers.packaging import spec_from_callable

    if not callable(refit):
        raise ObjectiveError(
            f"refit must be callable, got a {type(refit).__name__}; pass a function that takes "
            "the best parameters as a dict, or refit=None."
        )
    name = f"{getattr(refit, '__module__', '?')}:{getattr(refit, '__qualname__', '?')}"
    return RefitPlan(spec_from_callable(refit), name, force)


def plan_from_command(
    command: str, space_path: Path | None, force: bool = False, launch_dir: Path | None = None
) -> RefitPlan:
    """A refit command whose placeholders are checked against the search space of ``--cmd``
    (without one, an objective study's, when the best parameters are filled in); its relative
    file names are found from ``launch_dir`` (default: the current folder)."""
    from hyperfleet.objective.command import CommandObjective
    from hyperfleet.sampling.space import SearchSpace, load_space

    if space_path is None:
        template = CommandObjective(command, SearchSpace(()), launch_dir=launch_dir, check=False)
    else:  # checks every placeholder
        template = CommandObjective(command, load_space(space_path), launch_dir=launch_dir)
    return replace(plan_from_callable(CommandRefit(template), force), target=f"cmd: {command}")


def plan_from_cli(
    target: str | None,
    command: str | None,
    space_path: Path | None,
    has_cmd: bool,
    force: bool,
) -> RefitPlan | None:
    """The plan for ``--refit``/``--refit-cmd``/``--force-refit``, or None without a refit."""
    if target is not None and command is not None:
        raise ConfigError("give either --refit FILE.py:FUNCTION or --refit-cmd COMMAND, not both.")
    if target is not None:
        return plan_from_target(target, force)
    if command is not None:
        if not has_cmd or space_path is None:
            raise ConfigError(
                "--refit-cmd fills in the parameters of --space, so it goes with --cmd and "
                "--space; for a TARGET function, pass --refit FILE.py:FUNCTION instead."
            )
        return plan_from_command(command, space_path, force)
    if force:
        raise ConfigError("--force-refit goes with --refit or --refit-cmd; add one of them.")
    return None


class CommandRefit:
    """The refit command as a refit function; picklable, so it travels to the refit process."""

    def __init__(self, template: CommandObjective) -> None:
        self.template = template  # a CommandObjective: its words, checked and made absolute

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        from hyperfleet import client
        from hyperfleet.objective.command import describe_exit

        number = int(os.environ.get(client.TRIAL_NUMBER_ENV) or -1)
        if not self.template.checked:
            _check_placeholders(self.template.words, params)
        argv = self.template.render(params, number)
        env = {**os.environ}
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            # The output goes straight to this process's stdout.log and stderr.log.
            status = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, check=False).returncode
        except OSError as exc:
            raise RefitError(f"the command {argv[0]!r} could not start ({exc.strerror})") from None
        if status != 0:
            raise RefitError(f"{describe_exit(status)}; {_stderr_end()}")
        return {"argv": argv, "exit_status": status}


def _check_placeholders(words: list[str], params: dict[str, Any]) -> None:
    from hyperfleet.objective.command import unknown_placeholder

    unknown = unknown_placeholder(words, set(params), of="the best trial")
    if unknown is not None:
        raise RefitError(f"the refit command {unknown}")


class RefitError(Exception):
    """A refit command failed; the message is the reason shown to the user."""


# ----- the controller's side ----------------------------------------------------------------


@dataclass(frozen=True)
class RefitOutcome:
    """How the refit went: ``status`` is "ran", "skipped" or "failed"; ``message`` says it;
    ``folder`` is where its output is (``best/refit/``: ``stdout.log``, ``result.json`` and
    whatever it wrote; after a skip, an earlier refit's, if one ran)."""

    status: str
    message: str
    folder: Path | None = None


def run_refit(
    plan: RefitPlan,
    study: optuna.Study,
    run_status: str,
    folder: Path,
    slot_env: Mapping[str, str],
    announce: Callable[[str], None],
) -> RefitOutcome:
    """Run the refit for a finished search in ``folder`` (``best/refit/``) unless it is not
    needed; ``announce`` is given one line that says what happened. ``run_status`` is how the
    search ended, whatever another study's refit did."""
    said = _Announcer(announce, f"study {plan.study}: " if plan.study else "")
    reason = _reason_to_skip(study, run_status)
    if reason:
        kept = folder if folder.is_dir() else None
        return said(RefitOutcome("skipped", f"refit skipped: {reason}", kept))
    best = study.best_trial
    cached, missing = _cached_at(folder, plan, best.params)
    if cached and not plan.force:
        return said(
            RefitOutcome(
                "skipped",
                f"refit skipped: best parameters unchanged since {cached}; "
                "--force-refit to run it again",
                folder,
            ),
        )
    again = f" (its output {missing} is gone)" if missing else ""
    announce(
        f"{said.prefix}refit {plan.target} started with trial {best.number}'s parameters "
        f"{best.params}{again}"
    )
    started = time.monotonic()
    failure = _run_child(plan, best.params, best.number, folder, slot_env)
    if failure:
        return said(RefitOutcome("failed", f"refit failed: {failure}", folder))
    write_json(folder / CACHE_NAME, _cache_entry(plan, best.params, best.number, folder))
    took = time.monotonic() - started
    return said(RefitOutcome("ran", f"refit done in {took:.1f}s: {folder}", folder))


class _Announcer:
    """Says an outcome's message, with the study's name first in a campaign (the outcome's
    message too, which a failed refit makes the run's)."""

    def __init__(self, announce: Callable[[str], None], prefix: str) -> None:
        self.announce, self.prefix = announce, prefix

    def __call__(self, outcome: RefitOutcome) -> RefitOutcome:
        outcome = replace(outcome, message=self.prefix + outcome.message)
        self.announce(outcome.message)
        return outcome


def _reason_to_skip(study: optuna.Study, run_status: str) -> str:
    from optuna.trial import TrialState

    if run_status != "completed":
        return f"the search ended {run_status}, not completed"
    if len(study.directions) > 1:
        return (
            "the study has several objectives and no single best trial; refit a Pareto "
            "trial yourself from best/trial-N/params.json"
        )
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return "no trial completed"
    return ""


def _cached_at(folder: Path, plan: RefitPlan, params: dict[str, Any]) -> tuple[str, str]:
    """When the cached refit in ``folder`` ran, if it ran ``plan`` with ``params`` and every
    file it left is still there; else "", with the first file that is gone, if one is."""
    try:
        entry = json.loads((folder / CACHE_NAME).read_text())
    except (OSError, ValueError):
        return "", ""
    if not isinstance(entry, dict):
        return "", ""
    if entry.get("target") != plan.target or entry.get("params") != _as_json(params):
        return "", ""
    outputs = entry.get("outputs")  # a cache written before outputs were listed has none
    listed = outputs if isinstance(outputs, list) else [RESULT_NAME]
    missing = next((str(name) for name in listed if not (folder / str(name)).exists()), "")
    if missing:
        return "", missing
    return str(entry.get("finished", "an earlier run")), ""


def _cache_entry(
    plan: RefitPlan, params: dict[str, Any], number: int, folder: Path
) -> dict[str, Any]:
    return {
        "target": plan.target,
        "params": _as_json(params),
        "trial": number,
        "finished": time.strftime(TIME_FORMAT),
        "outputs": _outputs(folder),
    }


def _outputs(folder: Path, limit: int = 1000) -> list[str]:
    """The files the refit left in ``folder`` (at most ``limit``), as paths relative to it:
    deleting one makes the next run refit. Links to folders are not followed."""
    found: list[str] = []
    for root, folders, files in os.walk(folder):
        folders.sort()
        for name in sorted(files):
            path = Path(root, name)
            if path.parent == folder and name in (CACHE_NAME, FAILURE_NAME):
                continue
            found.append(str(path.relative_to(folder)))
            if len(found) >= limit:
                return found
    return found


def _as_json(data: Any) -> Any:
    # Compared the way it is stored, so a cached entry read back equals a fresh one.
    return json.loads(json.dumps(data, default=str))


def _run_child(
    plan: RefitPlan,
    params: dict[str, Any],
    number: int,
    folder: Path,
    slot_env: Mapping[str, str],
) -> str:
    """Run the refit in a fresh folder; "" when it succeeded, else the reason it failed."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)  # an earlier refit for other parameters
    folder.mkdir(parents=True)
    request = RefitRequest(plan.spec, dict(params), number, str(folder), plan.args)
    with open(folder / "stdout.log", "wb") as out, open(folder / "stderr.log", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "hyperfleet.objective.refit"],
            env={**os.environ, **slot_env},
            cwd=folder,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
        )
        try:
            assert process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(pickle.dumps(request))
                process.stdin.close()
            status = process.wait()
        finally:
            if process.poll() is None:  # interrupted while waiting: leave nothing running
                process.kill()
                process.wait()
    return "" if status == 0 else _failure_reason(folder, status)


def _failure_reason(folder: Path, status: int) -> str:
    from hyperfleet.objective.command import describe_exit

    failure = folder / FAILURE_NAME
    try:
        reason = str(json.loads(failure.read_text())["reason"])
        failure.unlink()
    except (OSError, ValueError, KeyError):
        reason = describe_exit(status, "the refit process")
    return f"{reason} (see {folder / 'stderr.log'})"


def _stderr_end() -> str:
    """The end of this process's stderr.log (the refit folder's), for a failed command."""
    from hyperfleet.store.rundir import tail

    sys.stderr.flush()
    text = tail(Path("stderr.log"), STDERR_TAIL_CHARS).strip()
    last = text.splitlines()[-1] if text else ""
    return f"the last line of its stderr: {last}" if last else "its stderr was empty"


# ----- the refit process ----------------------------------------------------------------------


def main() -> None:
    # As a worker does, before the refit imports anything that starts threads.
    from hyperfleet.workers.main import pin_cores_first

    pin_cores_first()
    request: RefitRequest = pickle.loads(sys.stdin.buffer.read())
    _detach_stdin()
    from hyperfleet import client

    os.environ[client.PARAMS_ENV] = json.dumps(request.params, default=str)
    os.environ[client.TRIAL_NUMBER_ENV] = str(request.trial_number)
    folder = Path(request.folder)
    try:
        value = _call_refit(request, folder)
    except BaseException as exc:  # SystemExit too: it is the refit's failure, told in one line
        traceback.print_exc()
        write_json(folder / FAILURE_NAME, {"reason": _one_line(exc)})
        sys.exit(1)
    write_json(folder / RESULT_NAME, _result(request, value))


def _call_refit(request: RefitRequest, folder: Path) -> Any:
    from hyperfleet.workers.runner import load_objective

    # Loaded as an objective is, though it takes the parameters rather than a trial.
    refit: Callable[[dict[str, Any]], Any] = load_objective(request.spec)  # type: ignore[assignment]
    os.chdir(folder)  # loading may have moved to where hyperfleet was started
    if request.args is not None and takes_args(refit):
        return refit(dict(request.params), args=dict(request.args))  # type: ignore[call-arg]
    return refit(dict(request.params))


def takes_args(function: Callable[..., Any]) -> bool:
    """Whether ``function`` can be given ``args=`` (a parameter of that name, or ``**kwargs``):
    refit functions written before campaigns passed it keep working unchanged."""
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin or an object without a signature
        return False
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(
        (p.name == "args" and p.kind in named) or p.kind == inspect.Parameter.VAR_KEYWORD
        for p in parameters
    )


def _result(request: RefitRequest, value: Any) -> dict[str, Any]:
    from hyperfleet.workers.runner import _plain

    data: dict[str, Any] = {
        "params": request.params,
        "trial": request.trial_number,
        "finished": time.strftime(TIME_FORMAT),
    }
    if request.args is not None:
        data["args"] = request.args
    value = _plain(value)
    try:
        json.dumps(value)
        data["value"] = value
    except (TypeError, ValueError):
        data["value_repr"] = repr(value)[:2000]
    return data


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})"
    if isinstance(exc, RefitError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _detach_stdin() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the pickled refit refers to
    # hyperfleet.objective.refit's classes (RefitError), which must be the ones main() catches.
    from hyperfleet.objective.refit import main as module_main

    module_main()
