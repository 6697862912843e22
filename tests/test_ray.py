"""A local Ray cluster of three nodes with fake GPUs: Ray places one agent per node, with the
node's GPUs reserved through Ray, a campaign and a search use every slot of every node, and a
node Ray removes loses only its trials, which run again on the others. On a cluster shared with
other work, an agent takes what its node can give and the run grows when more frees up; an
agent that dies is started again; a drained node's trials save or end in time. Each test
starts a cluster of its own: one run's agents must not be in the way of the next run's."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
from optuna.trial import TrialState

import hyperfleet
from support import node_objective
from support.node_objective import where_it_runs
from support.procs import wait_until
from support.ray_cluster import Search, local_cluster, other_job
from support.ray_objectives import LONG_ON_ENV, saves_when_asked

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
        # Each agent reserves its node's CPUs and pins its slots to as many cores: two, the
        # cores of the machine, as each node were one.
        cluster = cluster_utils.Cluster(
            initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": NODE_GPUS[0]}
        )
        try:
            for gpus in NODE_GPUS[1:]:
                cluster.add_node(num_cpus=2, num_gpus=gpus)
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
    expected = _gpu_slots(ray_cluster.address)
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
    expected = _gpu_slots(ray_cluster.address)
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
    # Every slot of the node has had a trial that recorded its slot before the node goes (its
    # workers may load one after the other, and a trial lost before its objective said where
    # it runs names no slot), so that every slot of the cluster is among those named below.
    its_slots = {slot for slot in expected if slot.startswith(f"{name}/")}

    def each_slot_named() -> bool:
        return its_slots <= {t.user_attrs.get("slot") for t in study.get_trials()}

    wait_until(each_slot_named, 120, f"a trial on each of {sorted(its_slots)}")
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


def _gpu_slots(address: str) -> set[str]:
    """The slot names of every GPU of every live node: ray-<node id>/gpu<k>#0."""
    # This cluster's address: "auto" takes the newest of the machine's, maybe another test's.
    ray.init(address=address, ignore_reinit_error=True)
    gpus = {node["NodeID"]: int(node["Resources"]["GPU"]) for node in ray.nodes() if node["Alive"]}
    return {f"ray-{node_id[:6]}/gpu{k}#0" for node_id, n in gpus.items() for k in range(n)}


# ----- a shared Ray cluster: what other work holds, agents that die, drained nodes ---------


def test_a_shared_node_gives_its_free_gpu_now_and_the_other_once_it_frees_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    head_only_cpus, shared_node = {"num_cpus": 1, "num_gpus": 0}, {"num_cpus": 2, "num_gpus": 2}
    with local_cluster(head_only_cpus, shared_node) as cluster:
        head, shared = (f"ray-{n.node_id[:6]}" for n in cluster.list_all_nodes())
        blocker = other_job(cluster.list_all_nodes()[-1].node_id)
        held = ray.get(blocker.gpus.remote())[0]  # the GPU and the CPU it holds, Ray's ids
        free = {"0": "1", "1": "0"}[held]
        search = Search(tmp_path, cluster.address, where_it_runs)
        search.wait_for(f"started on {shared}/gpu{free}#0")
        assert f"node {shared}: waiting for 1 GPU held by other Ray work" in search.text()
        # Its agent holds the free GPU and one CPU, the other job the rest: nothing is free.
        left = ray._private.state.available_resources_per_node()[
            cluster.list_all_nodes()[-1].node_id
        ]
        assert (left.get("GPU", 0), left.get("CPU", 0)) == (0, 0), left
        ray.kill(blocker)
        search.wait_for(f"started on {shared}-2/gpu{held}#0")
        trials = search.finish()
    # The head, started without GPUs, has no GPU slot however many its machine shows; with no
    # CPU slot asked for, it is not used, once.
    assert search.text().count(f"node {head} not used") == 1
    by_slot: dict[str, set[tuple[int, ...]]] = {}
    for trial in trials:
        by_slot.setdefault(trial.user_attrs["slot"], set()).add(
            tuple(trial.user_attrs["slot_cores"])
        )
    assert set(by_slot) == {f"{shared}/gpu{free}#0", f"{shared}-2/gpu{held}#0"}
    _assert_pinned(trials)
    # Each agent has the one core it reserved, not the other's.
    cores = [next(iter(c)) for c in by_slot.values()]
    assert all(len(c) == 1 for c in cores) and cores[0] != cores[1], by_slot


def test_a_node_whose_agent_dies_gets_a_fresh_one_whose_slots_take_trials_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with local_cluster({"num_cpus": 2, "num_gpus": 2}) as cluster:
        node = f"ray-{cluster.head_node.node_id[:6]}"
        search = Search(tmp_path, cluster.address, where_it_runs)
        for gpu in (0, 1):
            search.wait_for(f"started on {node}/gpu{gpu}#0")
        os.kill(_agent_process(node), signal.SIGKILL)  # its workers end with it
        search.wait_for(f"node {node}: its agent ended")
        for gpu in (0, 1):
            search.wait_for(f"started on {node}/gpu{gpu}#0", after=f"node {node}: its agent ended")
        trials = search.finish()
    assert search.text().count(f"node {node} joined") == 2
    assert trials
    # A lost trial may have no slot attribute (it comes with a result): look at every trial.
    lost = [t for t in search.study.get_trials() if t.state == TrialState.FAIL]
    assert lost and all(t.system_attrs["hyperfleet:fail_kind"] == "lost" for t in lost)


def _agent_process(node: str) -> int:
    """The process of the node's agent: the parent of its workers."""
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            slot = proc.environ().get("HYPERFLEET_SLOT", "")
            if f'"name": "{node}/' in slot:
                return proc.ppid()
    raise AssertionError(f"no worker of node {node} found")


def test_drained_nodes_get_no_new_trial_and_their_running_ones_save_or_end_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.core.generated import autoscaler_pb2

    monkeypatch.chdir(tmp_path)
    long_on = tmp_path / "long-on"
    one_gpu = {"num_cpus": 1, "num_gpus": 1}
    with local_cluster(one_gpu, one_gpu, one_gpu, **{LONG_ON_ENV: str(long_on)}) as cluster:
        asks, ignores = cluster.list_all_nodes()[1:]
        saver, late = (f"ray-{node.node_id[:6]}" for node in (asks, ignores))
        long_on.write_text(f"{saver} ask\n{late} ignore\n")  # their trials run long
        search = Search(tmp_path, cluster.address, saves_when_asked, kill_grace=1.0)
        for name in (saver, late):
            search.wait_for(f"started on {name}/gpu0#0")
        gcs = ray._raylet.GcsClient(address=cluster.address)
        preemption = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        now_ms = int(time.time() * 1000)
        # One node has a minute, the other 6 s: its trial, which never asks, is ended 3 s
        # (the kill grace and the margin) before that.
        for node, notice_ms in ((asks, 60_000), (ignores, 6_000)):
            assert gcs.drain_node(node.node_id, preemption, "preempted", now_ms + notice_ms)[0]
        for name in (saver, late):
            search.wait_for(f"node {name} is taken back by its engine in ")

        def repeated() -> list[optuna.trial.FrozenTrial]:
            trials = search.study.get_trials()
            done = [t for t in trials if "x" in t.params and t.state == TrialState.COMPLETE]
            firsts = [
                t for t in trials if t.user_attrs.get("slot", "").split("/")[0] in (saver, late)
            ]
            again = [t for t in done if t.params["x"] in {f.params["x"] for f in firsts}]
            return again if len(again) == 2 else []

        again = wait_until(repeated, 60, "both drained nodes' trials to run again")
        for node in (asks, ignores):
            cluster.remove_node(node)  # nothing runs there any more: nothing is lost
        for name in (saver, late):
            search.wait_for(f"node {name} lost")
        trials = search.finish()
    log = search.text()
    for name in (saver, late):
        assert f"started on {name}/" not in log[log.index(f"node {name} is taken back") :]
    assert {t.user_attrs.get("resumed_from") for t in again} == {f"{saver}/gpu0#0", None}
    assert not any(t.user_attrs["slot"].startswith((saver, late)) for t in again)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    kinds = Counter(t.system_attrs.get("hyperfleet:fail_kind") for t in failed)
    assert kinds == {"interrupted": 2}, kinds
    saved = next(t for t in failed if t.user_attrs["slot"].startswith(f"{saver}/"))
    reason = saved.system_attrs["hyperfleet:fail_reason"]
    assert f"stopped when asked to (node {saver} is taken back by its engine)" in reason
    ended = next(t for t in failed if t.user_attrs["slot"].startswith(f"{late}/"))
    assert f"node {late} was taken back" in ended.system_attrs["hyperfleet:fail_reason"]
    assert ended.datetime_complete.timestamp() * 1000 < now_ms + 6_000
