"""Which checkpoint folders outlive their trials: ``--keep-checkpoints best|all|none``.

A trial and its repeats share ``checkpoints/<first attempt>/`` (see
:mod:`hyperfleet.objective.resume`).
Once the chain has ended as COMPLETE or PRUNED nothing will continue from it, so its folder is
removed, unless the policy keeps it: ``all`` keeps every one, ``best`` the best trial's (the
Pareto front's, with several objectives), which ``best/checkpoint/`` links to, and ``none``
none. A chain that failed for good keeps its folder: a later run with a ``--retry`` rule that
allows it repeats the trial, which continues from there.

The controller removes a folder as its trial ends (one objective); :func:`sweep` settles the
rest at the start and end of each run (a Pareto front, a policy changed between runs, a
controller killed before it could remove one).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.store.schema import first_attempt

ENDED = (TrialState.COMPLETE, TrialState.PRUNED)


def best_numbers(study: optuna.Study, trials: Sequence[FrozenTrial]) -> set[int]:
    """The best trial's number, or the Pareto front's numbers; empty before any result."""
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return set()
    if len(study.directions) > 1:
        return {t.number for t in study.best_trials}
    return {study.best_trial.number}


def kept_roots(trials: Sequence[FrozenTrial], keep: str, best: set[int]) -> set[int]:
    """The first attempts whose folders the policy keeps among those of ended chains."""
    if keep == "all":
        return {first_attempt(t) for t in trials if t.state in ENDED}
    if keep == "best":
        return {first_attempt(t) for t in trials if t.number in best}
    return set()


def sweep(folder: Path, trials: Sequence[FrozenTrial], keep: str, best: set[int]) -> None:
    """Remove the folders in ``folder`` (``checkpoints/``) of ended chains the policy does not
    keep; a chain still running, waiting or failed keeps its folder."""
    if keep == "all" or not folder.is_dir():
        return
    ended = {first_attempt(t) for t in trials if t.state in ENDED}
    removable = ended - kept_roots(trials, keep, best)
    for entry in folder.iterdir():
        if entry.name.isdigit() and int(entry.name) in removable:
            remove(entry)


def remove(folder: Path) -> None:
    # A folder already gone (never made, or removed by an earlier sweep) is what is wanted.
    shutil.rmtree(folder, ignore_errors=True)
