"""What only hyperfleet knows about a trial, as tags for an experiment tracker.

Optuna's tracker callbacks (optuna-integration's ``MLflowCallback`` and the like) log a trial's
parameters, values and user attributes. Where the trial ran is hyperfleet's knowledge, kept in
the trial's storage: its slot (a system attribute), and through the slot's name its node and
GPUs; its duration; the trial it repeats. :func:`tracking_tags` reads them back as tags, and
:class:`TrackerTags` hands them to a tracker callback as user attributes, which
``MLflowCallback`` logs as tags of the trial's run (``tag_trial_user_attrs``, on by default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.errors import ConfigError
from hyperfleet.resources.slots import gpus_in_name, node_in_name
from hyperfleet.store import schema

SLOT_TAG = "hyperfleet.slot"
NODE_TAG = "hyperfleet.node"
GPUS_TAG = "hyperfleet.gpus"
DURATION_TAG = "hyperfleet.duration_s"
RETRY_TAG = schema.RETRY_ATTR  # the same name as the user attribute MLflowCallback already logs

Callback = Callable[[optuna.Study, FrozenTrial], None]


def tracking_tags(trial: FrozenTrial) -> dict[str, str]:
    """hyperfleet's tags for a trial, as strings (what trackers take as tags).

    ``hyperfleet.slot`` (``gpu0#1``, ``cpu#0``), ``hyperfleet.node`` (only for a trial that ran
    on a node), ``hyperfleet.gpus`` (``0`` or ``0,1``; only on a GPU slot),
    ``hyperfleet.duration_s`` (once it ended) and ``hyperfleet.retry_of`` (the number of the
    trial it repeats; only on a repeat). A tag that does not apply is left out; a trial that
    hyperfleet did not run gets none of the first three.
    """
    tags: dict[str, str] = {}
    slot = trial.system_attrs.get(schema.SLOT_ATTR)
    if isinstance(slot, str) and slot:
        tags[SLOT_TAG] = slot
        if node := node_in_name(slot):
            tags[NODE_TAG] = node
        if gpus := gpus_in_name(slot):
            tags[GPUS_TAG] = ",".join(str(gpu) for gpu in gpus)
    ended = schema.ended_at(trial)
    if trial.datetime_start is not None and ended is not None:
        tags[DURATION_TAG] = f"{(ended - trial.datetime_start).total_seconds():.3f}"
    repeats = schema.retry_of(trial)
    if repeats is not None:
        tags[RETRY_TAG] = str(repeats)
    return tags


class TrackerTags:
    """A tracker callback that also gets hyperfleet's :func:`tracking_tags`.

    ``callbacks=[hyperfleet.TrackerTags(MLflowCallback(...))]``: the wrapped callback is called
    as before, with a copy of the trial whose user attributes hold the tags too (the stored
    trial is unchanged). ``MLflowCallback`` logs user attributes as tags of the trial's run; a
    callback that logs no user attributes (W&B's, TensorBoard's) logs no tags this way: call
    :func:`tracking_tags` in a callback of your own there.
    """

    def __init__(self, callback: Callback) -> None:
        if not callable(callback):
            raise ConfigError(
                f"TrackerTags takes a callback, called with (study, frozen_trial); "
                f"{callback!r} is not callable"
            )
        self.callback = callback

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        tagged = copy.deepcopy(trial)
        tagged.user_attrs = {**trial.user_attrs, **tracking_tags(trial)}
        self.callback(study, tagged)

    def __repr__(self) -> str:
        return f"TrackerTags({self.callback!r})"
