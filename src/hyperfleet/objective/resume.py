"""What an objective calls to continue from where an earlier attempt of its trial stopped.

::

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        state = hyperfleet.checkpoint_dir(trial) / "state.pt"
        start = 0
        if state.exists():                      # an earlier attempt was interrupted
            start = load(state, model, optimiser)
        for epoch in range(start, EPOCHS):
            accuracy = train_one_epoch(model, optimiser)
            trial.report(accuracy, epoch)
            save(state, model, optimiser, epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned()
            if hyperfleet.should_stop(trial):   # SIGTERM: the run is stopping
                raise hyperfleet.TrialInterrupted()
        return accuracy

Under hyperfleet the folder is ``RUN_DIR/checkpoints/<n>/``, where ``n`` is the number of the
trial's first attempt: every repeat of the trial (after an interruption, a crash, a retry of
any kind) gets the same folder, in this run or a later one. Both functions take the trial, so
that under plain ``study.optimize`` (threads included) each trial still gets a folder of its
own: a fresh temporary one, removed when the trial object goes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import optuna

from hyperfleet.errors import TrialInterrupted
from hyperfleet.workers.remote_trial import RemoteTrial

__all__ = ["TrialInterrupted", "checkpoint_dir", "should_stop"]

# Outside hyperfleet: each trial object's temporary folder, for as long as the trial lives.
_local_folders: weakref.WeakKeyDictionary[optuna.trial.BaseTrial, Path] = (
    weakref.WeakKeyDictionary()
)


def checkpoint_dir(trial: optuna.trial.BaseTrial) -> Path:
    """The folder this trial shares with every repeat of it, made if missing: what an earlier
    attempt saved there is still there. Outside hyperfleet, a fresh temporary folder."""
    if isinstance(trial, RemoteTrial) and trial._checkpoint_dir:
        return make_checkpoint_dir(Path(trial._checkpoint_dir))
    folder = _local_folders.get(trial)
    if folder is None:
        folder = _local_folders[trial] = Path(tempfile.mkdtemp(prefix="hyperfleet-checkpoint-"))
        weakref.finalize(trial, shutil.rmtree, folder, True)
    return folder


def should_stop(trial: optuna.trial.BaseTrial) -> bool:
    """Whether hyperfleet wants this trial to stop soon: the run got SIGTERM (SLURM, Kubernetes
    and cloud preemption send it) and running trials have ``--stop-grace`` left. Save a
    checkpoint, then raise :class:`TrialInterrupted`; the next attempt continues from it.

    Each call asks the controller (tens of microseconds): call it once per step or epoch.
    Outside hyperfleet, and after a first Ctrl+C (which lets trials finish), it answers False.
    """
    if isinstance(trial, RemoteTrial):
        return trial._stop_asked()
    return False


def make_checkpoint_dir(folder: Path) -> Path:
    """Make ``RUN_DIR/checkpoints/<n>/`` and no more: a run folder deleted or moved during the
    run must not be made again here (the run stops on its own)."""
    for level in (folder.parent, folder):
        with contextlib.suppress(FileExistsError):
            os.mkdir(level)
    return folder
