"""A shared Ray cluster: how soon the run takes a GPU another job frees, and what a drain costs.

    python bench/ray_shared.py               # one round of each
    python bench/ray_shared.py --repeats 3

``grow``: a local Ray cluster whose node has two GPUs, one held by another job's actor. The
run starts on the free one; then the other job is killed. The figure is the time from the kill
to the first trial on the freed GPU (read from the storage).

``drain``: two nodes of one GPU; a trial on the second runs until ``should_stop`` answers True,
then saves a checkpoint and stops. The node is drained with a 30 s notice (Ray's preemption
drain). The figures are the time from the notice to that trial's repeat on the other node (from
its checkpoint), and the trials lost: the node is removed once the repeat completed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from support.procs import wait_until  # noqa: E402 (the tests' own cluster and search)
from support.ray_cluster import Search, local_cluster, other_job  # noqa: E402
from support.ray_objectives import LONG_ON_ENV, saves_when_asked  # noqa: E402

NOTICE_SECONDS = 30


def grow(folder: Path) -> float:
    import ray

    with local_cluster({"num_cpus": 1, "num_gpus": 0}, {"num_cpus": 2, "num_gpus": 2}) as cluster:
        node = cluster.list_all_nodes()[-1]
        name = f"ray-{node.node_id[:6]}"
        blocker = other_job(node.node_id)
        ray.get(blocker.gpus.remote())
        search = Search(folder, cluster.address, saves_when_asked)
        search.wait_for(f"started on {name}/")
        freed_at = time.time()
        ray.kill(blocker)
        search.wait_for(f"started on {name}-2/")
        trials = search.finish()
    starts = [
        t.datetime_start.timestamp()
        for t in trials
        if t.user_attrs["slot"].startswith(f"{name}-2/") and t.datetime_start is not None
    ]
    return min(starts) - freed_at


def drain(folder: Path) -> tuple[float, int]:
    import ray
    from ray.core.generated import autoscaler_pb2

    long_on = folder / "long-on"
    one_gpu = {"num_cpus": 1, "num_gpus": 1}
    with local_cluster(one_gpu, one_gpu, **{LONG_ON_ENV: str(long_on)}) as cluster:
        node = cluster.list_all_nodes()[-1]
        name = f"ray-{node.node_id[:6]}"
        long_on.write_text(f"{name} ask\n")
        search = Search(folder, cluster.address, saves_when_asked)
        search.wait_for(f"started on {name}/")
        gcs = ray._raylet.GcsClient(address=cluster.address)
        preemption = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        noticed_at = time.time()
        deadline_ms = int(noticed_at * 1000) + NOTICE_SECONDS * 1000
        assert gcs.drain_node(node.node_id, preemption, "preempted", deadline_ms)[0]
        repeat = wait_until(
            lambda: [t for t in search.study.get_trials() if "resumed_from" in t.user_attrs],
            60,
            "the stopped trial's repeat",
        )[0]
        wait_until(
            lambda: search.study.trials[repeat.number].state.is_finished(), 60, "the repeat's end"
        )
        cluster.remove_node(node)
        search.wait_for(f"node {name} lost")
        trials = search.finish()
    lost = sum(t.system_attrs.get("hyperfleet:fail_kind") == "lost" for t in trials)
    assert repeat.datetime_start is not None
    return repeat.datetime_start.timestamp() - noticed_at, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    grown, drained, lost = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            grown.append(grow(Path(tmp)))
        with tempfile.TemporaryDirectory() as tmp:
            seconds, count = drain(Path(tmp))
            drained.append(seconds)
            lost.append(count)
    for what, times in (
        ("freed GPU to its first trial", grown),
        ("drain notice to the repeat", drained),
    ):
        shown = " ".join(f"{t:.2f}" for t in times)
        print(
            f"{what:<30} median {statistics.median(times):.2f} s, max {max(times):.2f} s ({shown})"
        )
    print(f"trials lost to the drains: {sum(lost)}")


if __name__ == "__main__":
    main()
