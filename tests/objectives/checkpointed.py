"""A training loop without PyTorch that checkpoints a counter, as an epoch loop would save its
model and optimiser.

Each step stands for an epoch: it takes ``STEP_SECONDS``, reports ``curve(x, step)`` and, every
``CHECKPOINT_EVERY`` steps, saves the next step to run in ``checkpoint_dir(trial)/state.json``.
An attempt starts from the saved step (``CHECKPOINTS=off``: always from step 0, for the
benchmark's comparison). When ``should_stop`` says so it saves at once and raises
``TrialInterrupted``. Everything that happens is a line in ``$TEST_FOLDER/log``:

    attempt <number> <x> <folder> from <step>   an attempt starts (at the saved step)
    step <number> <x> <step>                    a step ran (after its report and its save)
    saved <number> <x> <next step>              the checkpoint now says so
    stopped <number> <x> <next step>            saved because should_stop said so
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import optuna

import hyperfleet

STATE = "state.json"


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


def curve(x: float, step: int) -> float:
    """The value reported at ``step``: the same in every attempt, so a curve can be checked."""
    return x + 1.0 / (step + 1)


def steps() -> int:
    return int(_setting("CHECKPOINT_STEPS", "12"))


def _log(line: str) -> None:
    # One short append per line: lines from parallel workers never interleave.
    with open(Path(os.environ["TEST_FOLDER"]) / "log", "a") as handle:
        handle.write(line + "\n")


def _save(state: Path, next_step: int) -> None:
    building = state.with_name(STATE + ".new")
    building.write_text(json.dumps({"next_step": next_step}))
    os.replace(building, state)  # a kill never leaves half a checkpoint


def counter(trial: optuna.Trial) -> float:
    every = int(_setting("CHECKPOINT_EVERY", "1"))
    step_seconds = float(_setting("STEP_SECONDS", "0.05"))
    use = _setting("CHECKPOINTS", "on") != "off"
    x = trial.suggest_float("x", 0.0, 1.0)
    folder = hyperfleet.checkpoint_dir(trial)
    state = folder / STATE
    start = json.loads(state.read_text())["next_step"] if use and state.exists() else 0
    name = f"{trial.number} {x!r}"
    _log(f"attempt {name} {folder} from {start}")
    for step in range(start, steps()):
        time.sleep(step_seconds)  # stands for the work of one epoch
        trial.report(curve(x, step), step)
        if use and (step + 1) % every == 0:
            _save(state, step + 1)
            _log(f"saved {name} {step + 1}")
        _log(f"step {name} {step}")
        if hyperfleet.should_stop(trial):
            if use:
                _save(state, step + 1)
            _log(f"stopped {name} {step + 1}")
            raise hyperfleet.TrialInterrupted()
    return curve(x, steps() - 1)


def interrupts_itself(trial: optuna.Trial) -> float:
    """Raises TrialInterrupted although nothing asked it to stop."""
    trial.suggest_float("x", 0.0, 1.0)
    raise hyperfleet.TrialInterrupted()
