"""A local Ray cluster of three nodes with fake GPUs: Ray places one agent per node, with the
node's GPUs reserved through Ray, the search uses every slot of every node, and a node Ray
removes loses only its trials, which run again on the others."""

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
from support.node_objective import where_it_runs
from support.procs import wait_until

pytestmark = pytest.mark.cluster
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hyperfleet[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")

NODE_GPUS = (2, 2, 1)
N_TRIALS = 30  # enough that a worker slow to start on a loaded machine still gets some


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # Every node's processes inherit this: each agent finds fake GPUs, limited to the ones Ray
    # gives its task in CUDA_VISIBLE_DEVICES.
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "2")
    monkeypatch.setenv("HYPERFLEET_TEST_NAP", "0.5")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
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


def test_ray_places_one_agent_per_node_and_a_removed_node_loses_only_its_trials(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    gpus = {node["NodeID"]: int(node["Resources"]["GPU"]) for node in _alive()}
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
    wait_until(lambda: log.exists() and f"started on {name}/" in log.read_text(), 120, name)
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
    expected = {f"ray-{node_id[:6]}/gpu{k}#0" for node_id, n in gpus.items() for k in range(n)}
    assert {t.user_attrs["slot"] for t in trials if "slot" in t.user_attrs} == expected
    for trial in (t for t in trials if t.state == TrialState.COMPLETE):
        local = trial.user_attrs["slot"].partition("/")[2]
        assert trial.user_attrs["cuda_visible_devices"] == local[len("gpu")]
        assert trial.user_attrs["affinity"] == trial.user_attrs["slot_cores"]


def _alive() -> list[dict[str, Any]]:
    ray.init(address="auto", ignore_reinit_error=True)
    return [node for node in ray.nodes() if node["Alive"]]
