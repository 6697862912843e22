"""A local Ray cluster of three nodes with fake GPUs: Ray places one agent per node, with the
node's GPUs reserved through Ray, a campaign and a search use every slot of every node, and a
node Ray removes loses only its trials, which run again on the others. Each test starts a
cluster of its own: one run's agents must not be in the way of the next run's."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import hyperfleet
from support import node_objective
from support.node_objective import where_it_runs
from support.procs import wait_until

pytestmark = pytest.mark.cluster
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hyperfleet[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")

NODE_GPUS = (2, 2, 1)
N_TRIALS = 30  # enough that a worker slow to start on a loaded machine still gets some


@pytest.fixture
def ray_cluster() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as patch:
        # Every node's processes inherit this: each agent finds fake GPUs, limited to the ones
        # Ray gives its task in CUDA_VISIBLE_DEVICES.
        patch.setenv("HYPERFLEET_FAKE_GPUS", "2")
        patch.setenv("HYPERFLEET_TEST_NAP", "0.5")
        patch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        cluster = cluster_utils.Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": NODE_GPUS[0]}
        )
        try:
            for gpus in NODE_GPUS[1:]:
                cluster.add_node(num_cpus=1, num_gpus=gpus)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


CAMPAIGN = """
[campaign]
name = "on-ray"
run_dir = "run"
ray = "{address}"

[pool]
cpu_slots = 0

[defaults]
n_trials = 12
direction = "maximize"
objective = "{objective}:where_it_runs"
slot = {{ gpus = 1 }}

[[study]]
name = "a"

[[study]]
name = "b"
"""


def test_a_campaign_on_ray_uses_every_slot_of_every_node(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    expected = _gpu_slots()
    campaign = tmp_path / "campaign.toml"
    objective = Path(node_objective.__file__)
    campaign.write_text(CAMPAIGN.format(address=ray_cluster.address, objective=objective))
    outcome = hyperfleet.run_campaign(campaign, display="quiet", report=False)
    assert outcome.status == "completed", outcome.message
    used: set[str] = set()
    for study in outcome.studies:
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 12, study.study_name
        used |= {t.user_attrs["slot"] for t in trials}
        _assert_pinned(trials)
    assert used == expected


def test_ray_places_one_agent_per_node_and_a_removed_node_loses_only_its_trials(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    expected = _gpu_slots()
    study = optuna.create_study(study_name="on-ray", direction="maximize")
    outcomes: list[Any] = []
    search = threading.Thread(
        target=lambda: outcomes.append(
            hyperfleet.optimize(
                study,
                where_it_runs,
                n_trials=N_TRIALS,
                ray=ray_cluster.address,
                cpu_slots=0,
                run_dir=tmp_path / "run",
                display="quiet",
                report=False,
            )
        )
    )
    search.start()
    removed = ray_cluster.list_all_nodes()[-1]  # a worker node, not the head
    name = f"ray-{removed.node_id[:6]}"
    log = tmp_path / "run" / "run.log"
    # Every slot of the node has had a trial before it goes (its workers may load one after
    # the other), so that every slot of the cluster is among those the trials name below.
    its_slots = sorted(slot for slot in expected if slot.startswith(f"{name}/"))
    wait_until(
        lambda: log.exists() and all(f"started on {slot}" in log.read_text() for slot in its_slots),
        120,
        f"a trial on each of {its_slots}",
    )
    ray_cluster.remove_node(removed)
    search.join(timeout=180)
    assert outcomes and outcomes[0].status == "completed", outcomes
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == N_TRIALS and states[TrialState.RUNNING] == 0
    assert states[TrialState.FAIL] >= 1, "the removed node was running no trial"
    for trial in (t for t in trials if t.state == TrialState.FAIL):
        assert trial.system_attrs["hyperfleet:fail_kind"] == "lost"
        assert f"node {name}" in trial.system_attrs["hyperfleet:fail_reason"]
    assert f"node {name} lost" in log.read_text()
    assert {t.user_attrs["slot"] for t in trials if "slot" in t.user_attrs} == expected
    _assert_pinned([t for t in trials if t.state == TrialState.COMPLETE])


def _assert_pinned(trials: list[optuna.trial.FrozenTrial]) -> None:
    """Each trial saw its slot's one GPU and its cores, from inside its worker."""
    for trial in trials:
        local = trial.user_attrs["slot"].partition("/")[2]
        assert trial.user_attrs["cuda_visible_devices"] == f"GPU-fake-{local[len('gpu')]}"
        assert trial.user_attrs["affinity"] == trial.user_attrs["slot_cores"]


def _gpu_slots() -> set[str]:
    """The slot names of every GPU of every live node: ray-<node id>/gpu<k>#0."""
    ray.init(address="auto", ignore_reinit_error=True)
    gpus = {node["NodeID"]: int(node["Resources"]["GPU"]) for node in ray.nodes() if node["Alive"]}
    return {f"ray-{node_id[:6]}/gpu{k}#0" for node_id, n in gpus.items() for k in range(n)}
