"""Inside a worker: load each study's objective when the controller asks, before the study's
first trial here; run each trial the controller sends; drop an objective once its study is
done."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.util
import multiprocessing.spawn
import numbers
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import optuna
import psutil

from hyperfleet.errors import HyperfleetError, TrialInterrupted
from hyperfleet.resources.slots import current_slot
from hyperfleet.workers.artifact_files import watch_file_system_stores
from hyperfleet.workers.descendants import descendants
from hyperfleet.workers.descendants import end as end_processes
from hyperfleet.workers.logline import say
from hyperfleet.workers.nodefolder import NodeRunFolder
from hyperfleet.workers.protocol import (
    TRIAL_ENDED,
    Finished,
    Load,
    Loaded,
    LoadFailed,
    ObjectiveSpec,
    Ready,
    Release,
    RunTrial,
    Shutdown,
    WorkerSetup,
)
from hyperfleet.workers.remote_trial import Channel, RemoteStudy, RemoteTrial

Objective = Callable[[optuna.Trial], Any]


def serve(conn: Connection) -> None:
    setup: WorkerSetup = conn.recv()
    watch_file_system_stores()  # before any objective runs: its stores write through it
    objectives: dict[str, Objective] = {}
    conn.send(Ready(pid=os.getpid()))
    # Processes an objective's module or factory started (a data loader pool, a local server)
    # belong to the worker, like the data it loaded; anything else is a trial's, and ends with it.
    loaded_with_objectives: set[psutil.Process] = set()
    channel = Channel(conn)
    node_folder = NodeRunFolder.from_env()  # on a node without the run directory
    while True:
        message = channel.next_message()
        if isinstance(message, Shutdown):
            end_processes(descendants(os.getpid()))
            return
        if isinstance(message, Load):
            try:
                objectives[message.study] = load_objective(setup.objectives[message.study])
            except BaseException as exc:  # the user's import may raise anything, SystemExit too
                text = f"{type(exc).__name__}: {exc}"
                conn.send(LoadFailed(text, user_traceback(exc), message.study))
                return  # half-run module code may have left anything behind: a fresh worker
            _keep_loaded()
            loaded_with_objectives = set(descendants(os.getpid()))
            conn.send(Loaded(message.study))
        elif isinstance(message, Release):
            objectives.pop(message.study, None)
            _drop_released()
        elif isinstance(message, RunTrial):
            if node_folder is not None:
                message = node_folder.start_trial(message, conn)
            finished = run_trial(channel, objectives[message.objective], message)
            if node_folder is not None:  # the agent sends the logs on before the result
                conn.send_bytes(TRIAL_ENDED)
            finished = _say_if_torch_has_no_cuda(finished)
            _send_finished(conn, replace(finished, gpu_peak_mib=_torch_peak_mib()))
            say(f"trial {message.number} ended: {finished.outcome} {finished.error_type}".rstrip())
            # After the result is on its way (the controller records it meanwhile), before this
            # worker reads its next trial: that trial finds the trial's processes gone, and a
            # failed trial's worker is replaced, its whole tree ended, by the controller.
            _end_trial_processes(loaded_with_objectives)
            _free_memory()


def _keep_loaded() -> None:
    """What an objective's module loaded (libraries, a data set) lives until its study is done;
    freezing it keeps the per-trial collection from scanning it again every trial (tens of
    milliseconds once scikit-learn or torch is imported)."""
    gc.collect()
    gc.freeze()


def _drop_released() -> None:
    """Free a released objective's data: unfrozen, so that the objects it held in reference
    cycles are collected too, and the freed heap handed back to the system (glibc keeps it
    otherwise, and the worker's resident memory would not go down)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # Linux; elsewhere the OS gets it later


def _end_trial_processes(kept: set[psutil.Process]) -> None:
    """End every process the trial started and left running, before the worker takes its next
    trial, so that trial finds the GPU memory and cores free. This worker is their subreaper,
    so those that left the process group or lost their parent are still found among its
    descendants. The worker's own threads start no process, so a trial that left none costs no
    scan of the process table.
    """
    end_processes([proc for proc in descendants(os.getpid()) if proc not in kept])


def load_objective(spec: ObjectiveSpec) -> Objective:
    if spec.main_preparation:
        # The objective lives in the user's script: re-run its module-level code here, as
        # multiprocessing's spawn does, so pickled references to __main__ resolve.
        multiprocessing.spawn.prepare(spec.main_preparation)
    for name, path in spec.module_files.items():
        import_file_as(name, Path(path))
    if spec.kind == "pickle":
        obj = pickle.loads(spec.payload)
    elif spec.kind == "file":
        obj = getattr(import_file(spec.location), spec.name)
    else:
        obj = getattr(importlib.import_module(spec.location), spec.name)
    if spec.factory_kwargs is not None:
        obj = obj(**spec.factory_kwargs)
    if not callable(obj):
        raise TypeError(f"{spec.describe()} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


def import_file(path: str) -> Any:
    """Import a user's script as a module named after the file, never as ``__main__``."""
    file = Path(path).resolve()
    sys.path.insert(0, str(file.parent))
    return import_file_as(file.stem, file)


def import_file_as(name: str, file: Path) -> Any:
    """Import ``file`` as module ``name``, registered in sys.modules so that pickles naming
    ``name`` resolve; once per worker, even when several studies' objectives need it."""
    loaded = sys.modules.get(name)
    loaded_file = getattr(loaded, "__file__", None)
    if loaded_file and os.path.isfile(loaded_file) and os.path.samefile(loaded_file, file):
        return loaded
    module_spec = importlib.util.spec_from_file_location(name, file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def user_traceback(exc: BaseException) -> str:
    """The traceback without hyperfleet's and importlib's own frames."""
    if isinstance(exc, HyperfleetError):
        return ""  # raised on purpose (a search started on import): its message says where
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "importlib" not in f.filename and "/hyperfleet/" not in f.filename
    ]
    if not frames:
        return ""  # hyperfleet's own check failed: its message says everything
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "Traceback (most recent call last):\n" + "".join(lines)


def run_trial(channel: Channel, objective: Objective, message: RunTrial) -> Finished:
    # The worker makes its trial's folder, sparing the controller a file-system call per trial;
    # not its parents: a run folder deleted meanwhile must not be made again here.
    with contextlib.suppress(FileExistsError):
        os.mkdir(message.trial_dir)
    os.chdir(message.trial_dir)
    study = RemoteStudy(channel, message.study)
    trial = RemoteTrial(
        channel,
        message.number,
        message.datetime_start,
        study,
        message.checkpoint_dir,
        message.suggestions,
        message.trial_id,
    )
    say(f"trial {message.number} of {message.study.study_name} started in {message.trial_dir}")
    with _output_to(Path(message.trial_dir)):
        try:
            value = objective(trial)
        except optuna.TrialPruned as exc:
            return Finished("pruned", message=str(exc))
        except TrialInterrupted as exc:  # it stopped when asked to: the controller checks that
            return Finished("interrupted", message=str(exc))
        except BaseException as exc:  # SystemExit too: a trial's exit must not end the worker
            text = traceback.format_exc()
            sys.stderr.write(text)
            return Finished(
                "error", error_type=type(exc).__name__, message=_describe(exc), traceback=text
            )
    return _returned(value, objective)


def _returned(value: Any, objective: Objective) -> Finished:
    if callable(value) and not isinstance(value, numbers.Number):
        # A factory given as the objective: without its arguments it was called with the
        # trial, and returned the objective instead of running it.
        return Finished("error", error_type="TypeError", message=_factory_hint(value, objective))
    return Finished("returned", value=_plain(value))


def _factory_hint(value: Any, objective: Objective) -> str:
    caller = getattr(objective, "__qualname__", "the objective")
    name = getattr(value, "__qualname__", None)
    kind = "class" if isinstance(value, type) else "function"
    what = f"the {kind} {name}" if name else f"a callable {type(value).__name__}"
    return (
        f"{caller} returned {what}, not a value: it looks like a factory; pass its arguments "
        "with --objective-arg NAME=VALUE (objective_kwargs= in Python), or give the objective "
        "itself."
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})"
    return str(exc)


def _plain(value: Any) -> Any:
    """Turn framework scalars (numpy, torch) into floats, so the controller never imports them."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (int, float, str)):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            return item()
    return value


def _send_finished(conn: Connection, finished: Finished) -> None:
    try:
        payload = pickle.dumps(finished)
    except Exception as exc:
        shown = repr(finished.value)[:200]
        finished = Finished("unsendable", message=f"{shown} cannot be sent back ({exc})")
        payload = pickle.dumps(finished)
    conn.send_bytes(payload)


@contextlib.contextmanager
def _output_to(trial_dir: Path) -> Iterator[None]:
    """Send fds 1 and 2 (Python's and any child's or C library's output) to the trial folder."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(trial_dir / "stdout.log", "ab") as out, open(trial_dir / "stderr.log", "ab") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _say_if_torch_has_no_cuda(finished: Finished) -> Finished:
    """A trial that failed on an NVIDIA GPU slot where torch cannot use CUDA (a CPU build, or a
    driver older than the CUDA torch was built for): its message says so, since torch's own
    error ("no NVIDIA driver", "not compiled with CUDA") points elsewhere."""
    torch = sys.modules.get("torch")
    if finished.outcome != "error" or torch is None or current_slot().gpu_kind != "cuda":
        return finished
    try:
        if torch.cuda.is_available():
            return finished
        cuda = torch.version.cuda
    except Exception:  # torch half-imported or broken: its own error says enough
        return finished
    built = f"built for CUDA {cuda}" if cuda else "a CPU build"
    note = (
        f" [hyperfleet: torch {torch.__version__} ({built}) cannot use CUDA in this worker "
        "although NVML lists its GPU: torch.cuda.is_available() is False; install a torch "
        "built for a CUDA this driver supports (nvidia-smi shows it)]"
    )
    return replace(finished, message=finished.message + note)


def _torch_peak_mib() -> int | None:
    """The most memory torch reserved on the GPU since the last trial, then reset; None when
    the objective did not use torch on a GPU (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        peak = int(torch.cuda.max_memory_reserved()) // (1024 * 1024)
        torch.cuda.reset_peak_memory_stats()
    except Exception:  # a broken CUDA context: the trial's own error says what happened
        return None
    return peak


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
