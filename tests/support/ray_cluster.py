"""A local Ray cluster with fake GPUs, and a search on it that the caller ends: for the Ray
tests and bench/ray_shared.py."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import hyperfleet
from support.procs import wait_until


@contextlib.contextmanager
def local_cluster(head: dict[str, int], *nodes: dict[str, int], **env: str) -> Iterator[Any]:
    """A local Ray cluster of these nodes (num_cpus, num_gpus), each with two fake GPUs of
    which its agent may use those Ray gives it; the caller is connected to it."""
    import ray  # here: the Ray tests skip where Ray is not installed
    from ray import cluster_utils

    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"HYPERFLEET_FAKE_GPUS": "2", "HYPERFLEET_TEST_NAP": "0.3"}.items():
            patch.setenv(name, value)
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=head)
        try:
            for node in nodes:
                cluster.add_node(**node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


BUDGET = 1000  # more than any of these runs reaches before the caller completes it


class Search:
    """A search on the cluster in a thread, on a storage the test shares: the test ends it
    by completing the budget from outside, as another run on the same storage would."""

    def __init__(self, folder: Path, address: str, objective: Any, **options: Any) -> None:
        storage = f"sqlite:///{folder / 'optuna.db'}"
        self.study = optuna.create_study(study_name="shared", storage=storage, direction="maximize")
        self.log = folder / "run" / "run.log"
        self._outcomes: list[Any] = []
        arguments = {"n_trials": BUDGET, "ray": address, "cpu_slots": 0, "display": "quiet"}
        arguments.update(run_dir=folder / "run", report=False, **options)
        self._thread = threading.Thread(
            target=lambda: self._outcomes.append(
                hyperfleet.optimize(self.study, objective, **arguments)
            )
        )
        self._thread.start()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, text: str, after: str = "", timeout: float = 60) -> None:
        """Until the run log has ``text``, after the first ``after`` line if given."""

        def seen() -> bool:
            log = self.text()
            start = log.find(after) if after else 0
            return start >= 0 and text in log[start:]

        wait_until(seen, timeout, f"{text!r} in the run log")

    def finish(self) -> list[optuna.trial.FrozenTrial]:
        """Complete the budget; the run ends once its running trials end. Its trials."""
        counted = sum(t.state == TrialState.COMPLETE for t in self.study.get_trials())
        x = optuna.distributions.FloatDistribution(0.0, 1.0)
        for _ in range(BUDGET - counted):
            self.study.add_trial(
                optuna.trial.create_trial(params={"x": 0.5}, distributions={"x": x}, value=0.0)
            )
        self._thread.join(timeout=120)
        assert self._outcomes and self._outcomes[0].status == "completed", self._outcomes
        return [t for t in self.study.get_trials() if "slot" in t.user_attrs]


def other_job(node_id: str) -> Any:
    """Another job's actor on the node, holding one GPU and one CPU until it is killed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class OtherJob:
        def gpus(self) -> list[str]:
            return list(ray.get_runtime_context().get_accelerator_ids()["GPU"])

    placed = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.remote(OtherJob).options(num_gpus=1, num_cpus=1, scheduling_strategy=placed).remote()
