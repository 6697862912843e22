"""The counter of ``checkpointed.py`` as a training script run with ``--cmd``, through the client.

It logs the same lines to ``$TEST_FOLDER/log``. With ``CRASH_AT=N``, an attempt that started
from step 0 reports step N and exits with status 3 before it saves that step, so its repeat
reports step N again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from hyperfleet import client


def curve(x: float, step: int) -> float:
    return x + 1.0 / (step + 1)


def _log(line: str) -> None:
    with open(Path(os.environ["TEST_FOLDER"]) / "log", "a") as handle:
        handle.write(line + "\n")


def _save(state: Path, next_step: int) -> None:
    building = state.with_name(state.name + ".new")
    building.write_text(json.dumps({"next_step": next_step}))
    os.replace(building, state)


def main() -> None:
    steps = int(os.environ.get("CHECKPOINT_STEPS", "6"))
    step_seconds = float(os.environ.get("STEP_SECONDS", "0.01"))
    crash_at = int(os.environ.get("CRASH_AT", "-1"))
    x = float(sys.argv[1])
    folder = client.checkpoint_dir()
    state = folder / "state.json"
    start = json.loads(state.read_text())["next_step"] if state.exists() else 0
    name = f"{client.trial_number()} {x!r}"
    _log(f"attempt {name} {folder} from {start}")
    for step in range(start, steps):
        time.sleep(step_seconds)  # stands for the work of one epoch
        client.report(curve(x, step), step)
        if step == crash_at and start == 0:
            sys.exit(3)
        _save(state, step + 1)
        _log(f"saved {name} {step + 1}")
        _log(f"step {name} {step}")
        if client.should_stop():
            _log(f"stopped {name} {step + 1}")
            sys.exit(0)
    client.result(curve(x, steps - 1))


if __name__ == "__main__":
    main()
