"""A command line as the objective: ``hyperfleet run --cmd "python train.py --lr {lr}"``.

:class:`CommandObjective` is an ordinary objective: in a worker it suggests the parameters of
its :class:`~hyperfleet.sampling.space.SearchSpace` through the trial it receives, fills them into
the command, and runs the command in the current directory (the worker has already moved into the
trial folder and holds the slot's GPUs, cores and thread limits, which the command inherits).

The command line
    It is split like a shell would (``shlex``) but run without a shell, so values never need
    quoting. A command that starts with ``python`` (``python3``, ``python3.12``) runs with the
    interpreter hyperfleet itself runs in (``sys.executable``), so a virtual environment that is
    not activated still has its packages; write the interpreter's full path to use another one.
    ``{NAME}`` is replaced by the parameter NAME (a format spec works too: ``{lr:.2e}``)
    and ``{{``/``}}`` stand for literal braces. Three more placeholders exist: ``{params_json}``
    (all of the trial's parameters as one JSON object), ``{trial_number}`` and ``{launch_dir}``
    (the folder hyperfleet was started from). A word that names a parameter absent from this
    trial (a ``when`` parameter of another branch) is left out, so write such options as one
    word: ``--momentum={momentum}``, not ``--momentum {momentum}``. Words that name an existing
    file where hyperfleet starts (``train.py``, ``config.yaml``) are made absolute, since each
    trial runs in its own folder; any other relative path is relative to the trial folder,
    where the command's own outputs belong.

The environment
    The command also finds its parameters as JSON in ``HYPERFLEET_PARAMS``, its trial number in
    ``HYPERFLEET_TRIAL_NUMBER``, in ``HYPERFLEET_CHECKPOINT_DIR`` the folder it shares with
    every repeat of the trial (``client.checkpoint_dir()``), and in ``HYPERFLEET_CLIENT`` the
    socket that :mod:`hyperfleet.client` talks to. ``PYTHONUNBUFFERED=1`` is set (unless set
    already) so that a Python script's output reaches the trial's stdout.log as it is printed.

The result
    ``client.result(value)``, or else the last line of stdout that is a JSON object with
    ``"value"`` (one objective) or ``"values"`` (several): ``{"value": 0.93}``. Intermediate
    values go through ``client.report(value, step)``; when ``client.should_prune()`` has
    answered True the trial ends as PRUNED however the command exits, and a command still
    running ``prune_grace`` seconds later is terminated. Likewise, once ``client.should_stop()``
    has answered True (the run got SIGTERM), the trial ends as interrupted however the command
    exits, unless it gave its result first. A command that exits with a non-zero
    status fails the trial with the status and the end of its stderr as the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import psutil

from hyperfleet import client
from hyperfleet.errors import ConfigError, ObjectiveError, TrialInterrupted
from hyperfleet.objective.resume import checkpoint_dir, should_stop
from hyperfleet.sampling.space import RESERVED_NAMES, Param, SearchSpace
from hyperfleet.store.rundir import write_all

STDERR_TAIL_CHARS = 1500
STDOUT_TAIL_BYTES = 64 * 1024
# After the command exits, how long to keep reading output that a process it started (and
# left running) may still hold open.
DRAIN_SECONDS = 2.0
# Where the poll for the command's exit falls back to, on systems without pidfd_open.
POLL_SECONDS = 0.1


class CommandError(ObjectiveError):
    """The command failed: it could not start, exited non-zero, or gave no result."""


class CommandObjective:
    """Runs ``command`` with parameters from ``space``; picklable, so it travels to workers."""

    def __init__(
        self,
        command: str | Sequence[str],
        space: SearchSpace,
        *,
        launch_dir: str | Path | None = None,
        prune_grace: float = 10.0,
        stop_grace: float = 5.0,
        check: bool = True,
    ) -> None:
        self.space = space
        # A refit command of an objective study names parameters no space declares: they are
        # checked when the best trial's are filled in (see hyperfleet.objective.refit.CommandRefit).
        self.checked = check
        self.launch_dir = str(Path(launch_dir if launch_dir is not None else Path.cwd()).resolve())
        self.prune_grace = prune_grace
        self.stop_grace = stop_grace
        words = with_this_python(split_command(command))
        if check:
            check_template(words, space)
        self.words = [self._absolute_if_file(word) for word in words]

    def _absolute_if_file(self, word: str) -> str:
        if placeholders(word) or Path(word).is_absolute():
            return word
        path = Path(self.launch_dir) / word
        return str(path) if path.is_file() else word

    @property
    def script_name(self) -> str:
        """The command's script (``train`` for ``python train.py``), for naming the study."""
        scripts = [w for w in self.words if w.endswith(".py") and not placeholders(w)]
        return Path(scripts[0] if scripts else self.words[0]).stem

    def render(self, values: Mapping[str, Any], trial_number: int) -> list[str]:
        """The command line of one trial: its words with this trial's values filled in."""
        fields = {
            **values,
            "params_json": json.dumps(dict(values)),
            "trial_number": trial_number,
            "launch_dir": self.launch_dir,
        }
        return [w.format(**fields) for w in self.words if placeholders(w) <= fields.keys()]

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        values = self.space.suggest(trial)
        argv = self.render(values, trial.number)
        env = {
            **os.environ,
            client.PARAMS_ENV: json.dumps(values),
            client.TRIAL_NUMBER_ENV: str(trial.number),
            client.CHECKPOINT_ENV: str(checkpoint_dir(trial)),
        }
        env.setdefault("PYTHONUNBUFFERED", "1")
        with _Session(trial, argv, env, self.prune_grace, self.stop_grace) as session:
            return session.run()


def split_command(command: str | Sequence[str]) -> list[str]:
    if isinstance(command, str):
        try:
            words = shlex.split(command)
        except ValueError as exc:
            raise ConfigError(
                f"cannot split the command {command!r}: {exc}; check its quotes."
            ) from None
    else:
        words = [str(w) for w in command]
    if not words:
        raise ConfigError("the command is empty; give one such as 'python train.py --lr {lr}'.")
    return words


def with_this_python(words: list[str]) -> list[str]:
    """A bare ``python`` command runs with hyperfleet's own interpreter: the one found on PATH
    may be another (a virtual environment that is not activated, a system Python without the
    script's packages), which fails every trial with ModuleNotFoundError."""
    if re.fullmatch(r"python(3(\.\d+)?)?", words[0]):
        return [sys.executable, *words[1:]]
    return words


def placeholders(word: str) -> set[str]:
    """The field names of ``{...}`` placeholders in one word of the command."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(word) if field is not None}
    except ValueError as exc:
        raise ConfigError(
            f"the command word {word!r} has a malformed placeholder ({exc}); write {{NAME}} for "
            "a parameter and {{ or }} for a literal brace."
        ) from None


def check_template(words: list[str], space: SearchSpace) -> None:
    """Every placeholder names a parameter, and every word renders with typical values."""
    unknown = unknown_placeholder(words, set(space.names))
    if unknown is not None:
        raise ConfigError(f"the command {unknown}")
    conditional = space.conditional_names()
    for index, word in enumerate(words):
        previous = words[index - 1] if index else ""
        alone = placeholders(word)
        if (
            len(alone) == 1
            and alone <= conditional
            and word.startswith("{")
            and previous.startswith("-")
            and not placeholders(previous)
        ):
            name = next(iter(alone))
            raise ConfigError(
                f"the command passes the conditional parameter {name!r} as '{previous} {word}'; "
                f"write it as one word, '{previous}={word}', so that trials without {name!r} "
                "leave out the option with its value."
            )
    _check_renders(words, space)


def unknown_placeholder(
    words: list[str], params: set[str], of: str = "the search space"
) -> str | None:
    """What is wrong with the first placeholder of ``words`` that names neither one of
    ``params`` (those ``of``) nor a reserved name, said for the end of a sentence; None when
    all are known."""
    known = params | RESERVED_NAMES
    for word in words:
        for field in placeholders(word):
            if field not in known:
                return (
                    f"uses {{{field}}}, which is no parameter of {of}; the "
                    f"placeholders it may use are {', '.join(sorted(known))} (write {{{{ and "
                    "}} for literal braces)."
                )
    return None


def _check_renders(words: list[str], space: SearchSpace) -> None:
    sample = {p.name: _typical(p) for p in space.params}
    fields = {**sample, "params_json": "{}", "trial_number": 0, "launch_dir": "."}
    for word in words:
        try:
            word.format(**fields)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ConfigError(
                f"the command word {word!r} cannot be filled in ({exc}); check its format spec "
                "against the parameter's type."
            ) from None


def _typical(param: Param) -> Any:
    if param.type == "categorical":
        return param.choices[0]
    return param.low


class _Session:
    """One run of the command: its output, its exit, and the client's calls, in one thread
    (the trial object is not thread-safe, so every call to it happens here)."""

    def __init__(
        self,
        trial: optuna.Trial,
        argv: list[str],
        env: dict[str, str],
        prune_grace: float,
        stop_grace: float,
    ) -> None:
        self.trial = trial
        self.argv = argv
        self.env = env
        self.prune_grace = prune_grace
        self.stop_grace = stop_grace
        self.selector = selectors.DefaultSelector()
        self.folder = _socket_folder()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process: subprocess.Popen[bytes] | None = None
        self.stdout_tail = bytearray()
        self.stderr_tail = bytearray()
        self.open_pipes = 0
        self.result: Any = None
        self.pruned_at: int | None = None
        self.stop_asked = False  # should_stop() answered True
        self.last_step: int | None = None
        self.signal_at: float | None = None
        self.exited_at: float | None = None
        self.terminated = False
        self.exit_watched = False  # by a pidfd in the selector; else by polling

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self._signal_tree(signal.SIGKILL)
            self.process.wait()
        for key in list(self.selector.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()
        self.listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def run(self) -> float | list[float]:
        self._start()
        assert self.process is not None
        while not self._finished():
            for key, _ in self.selector.select(self._timeout()):
                handler: Callable[[Any], None] = key.data
                handler(key.fileobj)
            self._check_exit()
            self._enforce_pruning()
        return self._outcome(self.process.returncode)

    def _start(self) -> None:
        address = os.path.join(self.folder, "client.sock")
        self.listener.bind(address)
        self.listener.listen()
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        try:
            self.process = subprocess.Popen(
                self.argv,
                env={**self.env, client.ADDRESS_ENV: address},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise CommandError(
                f"cannot start {self.argv[0]!r} ({exc.strerror}); check the program name and "
                "that it is on PATH (or give its full path)."
            ) from None
        assert self.process.stdout is not None and self.process.stderr is not None
        self._watch_pipe(self.process.stdout, 1, self.stdout_tail, STDOUT_TAIL_BYTES)
        self._watch_pipe(self.process.stderr, 2, self.stderr_tail, 4 * STDERR_TAIL_CHARS)
        opener = getattr(os, "pidfd_open", None)
        if opener is not None:
            with contextlib.suppress(OSError):
                exit_fd = _FileDescriptor(opener(self.process.pid))
                self.selector.register(exit_fd, selectors.EVENT_READ, self._on_exit_fd)
                self.exit_watched = True

    def _watch_pipe(self, pipe: Any, target_fd: int, tail: bytearray, keep: int) -> None:
        """Copy the pipe to our fd 1 or 2 (the trial's log files) and keep its last bytes."""

        def on_data(fileobj: Any) -> None:
            data = os.read(fileobj.fileno(), 65536)
            if not data:
                self.selector.unregister(fileobj)
                fileobj.close()
                self.open_pipes -= 1
                return
            write_all(target_fd, data)
            tail.extend(data)
            del tail[:-keep]

        self.selector.register(pipe, selectors.EVENT_READ, on_data)
        self.open_pipes += 1

    def _on_exit_fd(self, fileobj: _FileDescriptor) -> None:
        self.selector.unregister(fileobj)
        fileobj.close()
        self._check_exit()

    def _check_exit(self) -> None:
        assert self.process is not None
        if self.exited_at is None and self.process.poll() is not None:
            self.exited_at = time.monotonic()

    def _finished(self) -> bool:
        if self.exited_at is None:
            return False
        # Output still held open by a process the command left behind is read for a moment.
        return self.open_pipes == 0 or time.monotonic() > self.exited_at + DRAIN_SECONDS

    def _timeout(self) -> float | None:
        deadlines = [] if self.exit_watched else [time.monotonic() + POLL_SECONDS]
        if self.exited_at is not None:
            deadlines.append(self.exited_at + DRAIN_SECONDS)
        if self.signal_at is not None:
            deadlines.append(self.signal_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _enforce_pruning(self) -> None:
        """A pruned command gets ``prune_grace`` seconds to exit, then SIGTERM, then SIGKILL."""
        if self.signal_at is None or self.exited_at is not None:
            return
        if time.monotonic() < self.signal_at:
            return
        if not self.terminated:
            self.terminated = True
            self._signal_tree(signal.SIGTERM)
            self.signal_at = time.monotonic() + self.stop_grace
        else:
            self._signal_tree(signal.SIGKILL)
            self.signal_at = None

    def _signal_tree(self, sig: signal.Signals) -> None:
        """Signal the command and every process it started.

        The command stays in the worker's process group, so that a controller stopping the
        worker (trial timeout, a second Ctrl+C) stops the command too; so it is signalled by
        pid, with its descendants found before any of them can be orphaned.
        """
        assert self.process is not None
        try:
            command = psutil.Process(self.process.pid)
            family = [command, *command.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                member.send_signal(sig)

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = listener.accept()
            conn.setblocking(True)
            self.selector.register(conn, selectors.EVENT_READ, self._make_reader())

    def _make_reader(self) -> Callable[[socket.socket], None]:
        buffer = bytearray()

        def on_request(conn: socket.socket) -> None:
            data = conn.recv(65536)
            if not data:
                self.selector.unregister(conn)
                conn.close()
                return
            buffer.extend(data)
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer[:] = rest
                reply = self._answer(line)
                with contextlib.suppress(OSError):  # the script may be gone already
                    conn.sendall(json.dumps(reply).encode() + b"\n")

        return on_request

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            return {"value": self._handle(request)}
        except Exception as exc:  # the trial's own errors go back to the script to raise
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _handle(self, request: dict[str, Any]) -> Any:
        op = request.get("op")
        if op == "report":
            self.last_step = int(request["step"])
            self.trial.report(float(request["value"]), self.last_step)
            return None
        if op == "should_prune":
            if self.pruned_at is None and self.trial.should_prune():
                self._mark_pruned()
            return self.pruned_at is not None
        if op == "should_stop":
            self.stop_asked = self.stop_asked or should_stop(self.trial)
            return self.stop_asked
        if op == "set_user_attr":
            self.trial.set_user_attr(str(request["key"]), request["value"])
            return None
        if op == "result":
            self.result = request["values"] if "values" in request else request["value"]
            return None
        raise ValueError(f"unknown request {op!r}")

    def _mark_pruned(self) -> None:
        self.pruned_at = self.last_step if self.last_step is not None else -1
        self.signal_at = time.monotonic() + self.prune_grace

    def _outcome(self, status: int) -> float | list[float]:
        if self.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {self.pruned_at}")
        if self.stop_asked and self.result is None:
            raise TrialInterrupted(f"the command stopped when asked to ({describe_exit(status)})")
        if status != 0:
            raise CommandError(f"{describe_exit(status)}; {self._stderr_summary()}")
        if self.result is not None:
            return self.result  # type: ignore[no-any-return]
        found = last_result_line(self.stdout_tail.decode(errors="replace"))
        if found is None:
            raise CommandError(
                "the command exited with status 0 but gave no result; end it by printing a JSON "
                'line such as {"value": 0.93} or by calling hyperfleet.client.result(value).'
            )
        return found

    def _stderr_summary(self) -> str:
        text = self.stderr_tail.decode(errors="replace").strip()
        if not text:
            return "its stderr was empty"
        end = text[-STDERR_TAIL_CHARS:]
        # A GPU's out-of-memory line can end far above the tail (torch's lists every process
        # on the GPU): kept in front, so the failure is still filed as out of memory.
        from hyperfleet.store.schema import out_of_memory_line

        oom = out_of_memory_line(text) if not out_of_memory_line(end) else ""
        if oom:
            return f"{oom[:STDERR_TAIL_CHARS]}\n... the end of its stderr:\n{end}"
        return f"the end of its stderr:\n{end}"


def last_result_line(stdout: str) -> float | list[float] | None:
    """The value of the last stdout line that is a JSON object with "value" or "values"."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "values" in data:
            return data["values"]  # type: ignore[no-any-return]
        if isinstance(data, dict) and "value" in data:
            return data["value"]  # type: ignore[no-any-return]
    return None


def describe_exit(status: int, who: str = "the command") -> str:
    """``who was killed by signal SIGSEGV`` or ``who exited with status 3``."""
    if status < 0:
        return f"{who} was killed by signal {signal.Signals(-status).name}"
    return f"{who} exited with status {status}"


def _socket_folder() -> str:
    """A private folder for the client socket, short enough for AF_UNIX's ~108-byte paths."""
    folder = tempfile.mkdtemp(prefix="hf-")
    if len(folder) > 80:  # a long TMPDIR
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix="hf-", dir="/tmp")
    return folder


class _FileDescriptor:
    """A bare descriptor (the command's pidfd) as a selectable object."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
