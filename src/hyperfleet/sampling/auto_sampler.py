"""The default sampler: Optuna's GP where it pays, TPE with constant liar everywhere else.

On parallel slots, a sampler that models the objective's values (Optuna's ``GPSampler``, which
conditions on the running trials with qLogEI) keeps its search quality where TPE loses it
(``bench/parallel_quality.py``: Hartmann-6 on 8 slots). GP costs more per suggestion, growing
with the cube of the trials, needs torch, and models a fixed space of numbers. So
:class:`AutoSampler` runs TPE with constant liar (its random start: the first trials are random
whichever is chosen) until :data:`GP_STARTUP_TRIALS` trials have finished and the space is
known, then picks GP when all of these hold, and TPE otherwise:

- one objective (GP was measured on one only);
- a trial budget of at most :data:`GP_MAX_TRIALS` (no budget: the study may grow to where a
  suggestion takes many seconds);
- every finished trial has the same parameters, each a float or an integer (a categorical, or a
  parameter only some trials have, stays on TPE);
- the budget left covers :data:`GP_WAVES` rounds of the trials running (a search with nearly
  as many slots as trials is mostly random anyway, and GP's few suggestions did worse there);
- the finished trials took :data:`GP_MIN_TRIAL_SECONDS` or more (median): a GP suggestion
  takes about a second, one at a time per study, which hides behind trials of 10 s on up to
  about 10 slots, and only trials that cost that much are worth GP's care; a search of quick
  trials runs faster with TPE, whatever it loses per trial;
- torch imports.

A space that changes after GP was chosen (a parameter that appears or goes) moves the study to
TPE for good. ``on_choice`` is told the choice and its reason in one line when it is made.
The choice is made in ``before_trial``, which every ask calls on the asking thread: in
hyperfleet, the controller's loop. So the first suggestion after GP was chosen is computed
there; the controller prepares the following ones off its thread (controller/slow_samplers.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.sampling.delegating import DelegatingSampler

# A suggestion's cost at this many trials is what bench/RESULTS.md (2026-11-28, GP's cost)
# measured as still small beside trials worth running on many slots.
GP_MAX_TRIALS = 300
# Both TPE and GP sample at random until 10 trials have finished (their own defaults).
GP_STARTUP_TRIALS = 10
# The median trial duration from which GP is chosen (see the module's docstring).
GP_MIN_TRIAL_SECONDS = 10.0
# GP is chosen when the budget left after the random start covers this many rounds of the trials
# running then (about one per slot): with fewer, each of its few suggestions is made beside many
# pending trials, and on Levy 10-D at 32 slots (64 trials: 23 left for 31 running) it did
# worse than TPE with constant liar on 17 of 20 seeds (bench/RESULTS.md).
GP_WAVES = 2


def torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class AutoSampler(DelegatingSampler):
    """GP or TPE with constant liar, chosen by the rules above; ``n_trials`` is the study's
    trial budget (None: none)."""

    def __init__(
        self,
        seed: int | None = None,
        n_trials: int | None = None,
        min_trial_seconds: float = GP_MIN_TRIAL_SECONDS,
    ) -> None:
        self._seed = seed
        self._n_trials = n_trials
        self._min_trial_seconds = min_trial_seconds
        self._tpe = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        super().__init__(self._tpe)  # the chosen sampler, TPE until GP is chosen
        self.choice: str | None = None  # "gp" or "tpe" once chosen
        self.reason = ""
        self.on_choice: Callable[[str], None] | None = None

    def __str__(self) -> str:
        return f"AutoSampler({self.choice or 'undecided'})"

    @property
    def current(self) -> BaseSampler:
        return self.base

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # Called by every ask, on the thread that asks: the choice is made (and said) there.
        self._choose(study)
        self.base.before_trial(study, trial)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()
        if self.current is not self._tpe:
            self.current.reseed_rng()

    def _choose(self, study: optuna.Study) -> None:
        if self.choice == "tpe":
            return
        if self.choice is None:
            against = self._against_gp_from_the_start(study)
            if against:
                self._settle("tpe", against)
                return
        done = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if self.choice is None and len(done) < GP_STARTUP_TRIALS:
            return  # TPE's random start, until the space is known
        against = space_against_gp(done)
        if not against and self.choice is None:
            against = self._too_quick_for_gp(done) or self._too_parallel_for_gp(study)
        if against:
            self._settle("tpe", against)
        elif self.choice is None:
            if torch_importable():
                self._settle("gp", _why_gp(done[0].distributions, self._n_trials))
            else:
                self._settle("tpe", "GP would fit, but torch is not installed")

    def _against_gp_from_the_start(self, study: optuna.Study) -> str:
        if len(study.directions) > 1:
            return f"{len(study.directions)} objectives (GP is chosen for one objective only)"
        if self._n_trials is None:
            return "no trial budget (GP's cost per suggestion grows with the cube of the trials)"
        if self._n_trials > GP_MAX_TRIALS:
            return f"a budget of {self._n_trials} trials (GP is chosen up to {GP_MAX_TRIALS})"
        return ""

    def _too_parallel_for_gp(self, study: optuna.Study) -> str:
        trials = study._get_trials(deepcopy=False, states=None)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        left = (self._n_trials or 0) - len(trials)
        if left >= GP_WAVES * running:
            return ""
        return (
            f"{left} trials left for {running} running (GP is chosen when the budget left "
            f"covers {GP_WAVES} rounds of the running trials)"
        )

    def _too_quick_for_gp(self, done: Sequence[FrozenTrial]) -> str:
        seconds = statistics.median(_duration(t) for t in done)
        if seconds >= self._min_trial_seconds:
            return ""
        return (
            f"trials of {seconds:.1f} s (median); GP, about a second per suggestion, is chosen "
            f"for trials of {self._min_trial_seconds:g} s or more"
        )

    def _settle(self, choice: str, reason: str) -> None:
        if choice == "gp":
            self.base = optuna.samplers.GPSampler(seed=self._seed, warn_independent_sampling=False)
            line = f"sampler GP (Optuna's GPSampler): {reason}"
        else:
            self.base = self._tpe
            line = f"sampler TPE with constant liar: {reason}"
        self.choice, self.reason = choice, reason
        if self.on_choice is not None:
            self.on_choice(line)


def space_against_gp(done: Sequence[FrozenTrial]) -> str:
    """Why GP does not fit the search space these finished trials show; "" when it does."""
    if not done:
        return ""
    first = done[0].distributions
    for trial in done[1:]:
        if trial.distributions != first:
            return (
                f"the search space changes between trials (trials {done[0].number} and "
                f"{trial.number} differ); GP models a fixed space"
            )
    for name, distribution in first.items():
        if not isinstance(distribution, FloatDistribution | IntDistribution):
            return f"parameter {name!r} is categorical; GP is chosen for numbers only"
    return ""


def _duration(trial: FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _why_gp(space: dict[str, BaseDistribution], n_trials: int | None) -> str:
    return (
        f"one objective, a fixed space of {len(space)} numeric parameters, a budget of "
        f"{n_trials} trials (GP is chosen up to {GP_MAX_TRIALS}), torch installed"
    )
