"""A local Ray cluster of three nodes with fake GPUs: Ray places one agent per node, with the
node's GPUs reserved through Ray, and the search uses every slot of every node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import hyperfleet
from support.node_objective import where_it_runs

pytestmark = pytest.mark.cluster
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hyperfleet[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")

NODE_GPUS = (2, 2, 1)


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    # Every node's processes inherit this: each agent finds fake GPUs, limited to the ones Ray
    # gives its task in CUDA_VISIBLE_DEVICES.
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "2")
    monkeypatch.setenv("HYPERFLEET_TEST_NAP", "0.2")
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


def test_ray_places_one_agent_per_node_with_its_gpus(
    ray_cluster: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    study = optuna.create_study(study_name="on-ray", direction="maximize")
    outcome = hyperfleet.optimize(
        study,
        where_it_runs,
        n_trials=15,
        ray=ray_cluster.address,  # type: ignore[attr-defined]
        cpu_slots=0,
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
    )
    assert outcome.status == "completed", outcome.message
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 15
    nodes = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
    expected = {
        f"ray-{node_id[:6]}/gpu{k}#0"
        for node_id, node in nodes.items()
        for k in range(int(node["Resources"]["GPU"]))
    }
    assert {t.user_attrs["slot"] for t in trials} == expected
    for trial in trials:
        local = trial.user_attrs["slot"].partition("/")[2]
        assert trial.user_attrs["cuda_visible_devices"] == local[len("gpu")]
        assert trial.user_attrs["affinity"] == trial.user_attrs["slot_cores"]
