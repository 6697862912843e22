"""``hyperfleet.tracking_tags`` and ``hyperfleet.TrackerTags`` on stored trials: what only
hyperfleet knows about a trial (slot, node, GPUs, duration, the trial it repeats), read back
from the trial as tags for an experiment tracker. Runs against a real tracker are in
test_trackers_mlflow.py."""

from __future__ import annotations

import datetime

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState, create_trial

import hyperfleet
from hyperfleet.errors import ConfigError
from hyperfleet.resources.slots import gpus_in_name, node_in_name

START = datetime.datetime(2026, 1, 2, 3, 4, 5)


def stored(slot: str | None, seconds: float = 1.5, **user_attrs: object) -> FrozenTrial:
    trial = create_trial(
        state=TrialState.COMPLETE,
        value=0.5,
        params={"x": 0.25},
        distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
        system_attrs={"hyperfleet:slot": slot} if slot is not None else {},
        user_attrs=user_attrs,
    )
    trial.number = 4
    trial.datetime_start = START
    trial.datetime_complete = START + datetime.timedelta(seconds=seconds)
    return trial


@pytest.mark.parametrize(
    ("name", "node", "gpus"),
    [
        ("cpu#0", "", ()),
        ("gpu0#0", "", (0,)),
        ("gpu0+1#0", "", (0, 1)),
        ("gpu2:4#3", "", (2,)),  # a quarter of GPU 2 (a campaign's shape)
        ("gpu0+1-8c", "", (0, 1)),
        ("node3/gpu12#1", "node3", (12,)),
        ("gpu-box.lab/cpu4c#2", "gpu-box.lab", ()),  # a node named gpu-something
    ],
)
def test_a_slots_name_says_its_node_and_gpus(name: str, node: str, gpus: tuple[int, ...]) -> None:
    assert node_in_name(name) == node
    assert gpus_in_name(name) == gpus


def test_a_gpu_trial_on_a_node_gets_its_slot_node_gpus_and_duration() -> None:
    assert hyperfleet.tracking_tags(stored("node3/gpu1+2#0", seconds=2.25)) == {
        "hyperfleet.slot": "node3/gpu1+2#0",
        "hyperfleet.node": "node3",
        "hyperfleet.gpus": "1,2",
        "hyperfleet.duration_s": "2.250",
    }


def test_a_repeat_names_the_trial_it_repeats_and_a_cpu_trial_has_no_gpus() -> None:
    tags = hyperfleet.tracking_tags(stored("cpu#1", **{"hyperfleet.retry_of": 2}))
    assert tags == {
        "hyperfleet.slot": "cpu#1",
        "hyperfleet.duration_s": "1.500",
        "hyperfleet.retry_of": "2",
    }


def test_a_trial_hyperfleet_did_not_run_gets_only_its_duration() -> None:
    assert hyperfleet.tracking_tags(stored(None)) == {"hyperfleet.duration_s": "1.500"}
    running = stored(None)
    running.datetime_complete = None
    assert hyperfleet.tracking_tags(running) == {}


def test_tracker_tags_hands_a_tagged_copy_and_leaves_the_trial_as_stored() -> None:
    seen: list[FrozenTrial] = []
    trial = stored("gpu0#1", note="kept")
    study = optuna.create_study()
    hyperfleet.TrackerTags(lambda _study, frozen: seen.append(frozen))(study, trial)
    assert seen[0].user_attrs == {
        "note": "kept",
        "hyperfleet.slot": "gpu0#1",
        "hyperfleet.gpus": "0",
        "hyperfleet.duration_s": "1.500",
    }
    assert (seen[0].number, seen[0].params, seen[0].value) == (4, {"x": 0.25}, 0.5)
    assert trial.user_attrs == {"note": "kept"}


def test_tracker_tags_refuses_what_is_not_a_callback() -> None:
    with pytest.raises(ConfigError, match="TrackerTags takes a callback"):
        hyperfleet.TrackerTags("MLflowCallback")  # type: ignore[arg-type]
