"""A 1-D objective whose trials overlap in a chain: trial k ends only once trial k+1 runs.

Trial k touches ``started`` in its own folder (its working directory, ``RUN_DIR/trials/0000k``)
after its suggestion, then waits for ``../0000<k+1>/started``. With one slot this cannot finish (the
trial fails at the deadline); with two, every trial is suggested while its predecessor runs,
which is exactly when constant liar matters. The last trial's number comes from the environment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna

LAST_TRIAL_ENV = "PACED_LAST_TRIAL"
WAIT_SECONDS = 60.0


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("pid", os.getpid())
    Path("started").touch()
    if trial.number < int(os.environ[LAST_TRIAL_ENV]):
        wait_for_file(Path("..") / f"{trial.number + 1:05d}" / "started")
    return (x - 0.3) ** 2


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear: no trial ran alongside this one")
        time.sleep(0.01)  # polling interval of the condition above, not a synchronisation
