"""Recovery time of a lost node: from the failure to its trial running again on another node.

    python bench/recovery.py                 # default heartbeat (2s) and node timeout (10s)
    python bench/recovery.py --repeats 3 --modes kill,stop,cut
    python bench/recovery.py --modes heal,restart

Two more modes measure capacity coming back, with agents started once by hand and never
again: ``heal`` cuts nodeB's link for ``--cut-seconds`` (25 s), then sets it up again, and times
from the heal to nodeB's next trial (its agent kept trying to join); ``restart`` kills the
controller (SIGKILL) and runs the same command again, and times from the new start to the last
of the two nodes' first trials.

Each round starts a controller (``--listen``) and two agents on this machine, each playing a
node with fake GPUs: nodeB (one slot) takes the first trial, nodeA (two slots) joins and keeps
one slot idle. Then nodeB fails: ``kill`` (SIGKILL of the agent's process group: the connection
closes), ``stop`` (SIGSTOP of the agent: it goes silent) or ``cut`` (its veth link is set down
in a network namespace of its own: packets stop, needs root). The figure is the time from the
failure to the repeated trial's start on nodeA, read from the storage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from support.netns import Network, network  # noqa: E402 (the tests' own nodes)
from support.nodes import Agent, free_port, start_controller, wait_for_log  # noqa: E402
from support.procs import load_trials, wait_until  # noqa: E402

STUDY = "node_objective-where_it_runs"
RETRY_ATTR = "hyperfleet.retry_of"


def idle_slots_on(folder: Path, node: str) -> int:
    try:
        status = json.loads((folder / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(s["name"].startswith(f"{node}/") and s["state"] == "idle" for s in status["slots"])


def one_round(folder: Path, mode: str, nap: float, flags: list[str]) -> float:
    with ExitStack() as stack:
        net: Network | None = None
        if mode == "cut":
            net = stack.enter_context(network(["nodeA", "nodeB"]))
        host = net.controller_ip if net is not None else "127.0.0.1"
        address = f"{host}:{free_port(host)}"
        controller = start_controller(folder, address, 2, *flags)
        stack.callback(controller.stop)

        def agent(node: str, gpus: int) -> Agent:
            prefix = net.prefix(node) if net else ()
            started = Agent(folder, address, node, gpus, prefix, nap=nap)
            stack.callback(started.stop)
            return started

        b = agent("nodeB", 1)
        wait_for_log(folder, "started on nodeB/", 60)
        agent("nodeA", 2)
        wait_until(lambda: idle_slots_on(folder, "nodeA") >= 1, 60, "an idle slot on nodeA")
        failed_at = time.time()
        if mode == "kill":
            b.kill_group()
        elif mode == "stop":
            b.process.send_signal(19)  # SIGSTOP
        else:
            assert net is not None
            net.cut("nodeB")
        wait_for_log(folder, "(repeats trial", 60)
        controller.wait(nap * 3 + 60)
    trials = load_trials(folder / "run", STUDY)
    repeat = next(t for t in trials if RETRY_ATTR in t.user_attrs)
    assert repeat.datetime_start is not None
    return repeat.datetime_start.timestamp() - failed_at


def _first_start_on(folder: Path, node: str, after: float) -> float | None:
    """When the first trial on ``node`` started after ``after`` (epoch seconds), if one has."""
    starts = [
        t.datetime_start.timestamp()
        for t in load_trials(folder / "run", STUDY)
        if t.datetime_start is not None
        and str(t.user_attrs.get("slot", "")).startswith(f"{node}/")
        and t.datetime_start.timestamp() > after
    ]
    return min(starts) if starts else None


def heal_round(folder: Path, nap: float, flags: list[str], cut_seconds: float) -> float:
    with ExitStack() as stack:
        net = stack.enter_context(network(["nodeA", "nodeB"]))
        address = f"{net.controller_ip}:{free_port(net.controller_ip)}"
        controller = start_controller(folder, address, 10_000, *flags)
        stack.callback(controller.stop)
        for node, gpus in (("nodeA", 2), ("nodeB", 1)):
            stack.callback(Agent(folder, address, node, gpus, net.prefix(node), nap=nap).stop)
        wait_for_log(folder, "started on nodeB/", 60)
        net.cut("nodeB")
        time.sleep(cut_seconds)  # the outage being measured, not a synchronisation
        net.heal("nodeB")
        healed_at = time.time()
        found = wait_until(lambda: _first_start_on(folder, "nodeB", healed_at), 120, "nodeB")
        return found - healed_at


def restart_round(folder: Path, nap: float, flags: list[str]) -> float:
    with ExitStack() as stack:
        address = f"127.0.0.1:{free_port()}"
        controller = start_controller(folder, address, 10_000, *flags)
        for node, gpus in (("nodeA", 2), ("nodeB", 1)):
            stack.callback(Agent(folder, address, node, gpus, nap=nap).stop)
        wait_for_log(folder, "started on nodeB/", 60)
        wait_for_log(folder, "started on nodeA/", 60)
        controller.kill()
        restarted_at = time.time()
        again = start_controller(folder, address, 10_000, *flags)
        stack.callback(again.stop)
        firsts = [
            wait_until(lambda n=n: _first_start_on(folder, n, restarted_at), 120, n)
            for n in ("nodeA", "nodeB")
        ]
        return max(firsts) - restarted_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="kill,stop,cut")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--trial-seconds", type=float, default=15.0)
    parser.add_argument("--heartbeat", default="2s")
    parser.add_argument("--node-timeout", default="10s")
    parser.add_argument("--cut-seconds", type=float, default=25.0)
    args = parser.parse_args()
    flags = ["--heartbeat", args.heartbeat, "--node-timeout", args.node_timeout]
    print(f"heartbeat {args.heartbeat}, node timeout {args.node_timeout}; seconds from the")
    print("failure to the lost trial's start on another node (heal: from the heal to the")
    print("node's next trial; restart: from the controller's new start to both nodes' first)")
    print(f"{'mode':<6} {'median s':>9} {'max s':>7}  runs")
    for mode in args.modes.split(","):
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                if mode == "heal":
                    times.append(heal_round(Path(tmp), 1.0, flags, args.cut_seconds))
                elif mode == "restart":
                    times.append(restart_round(Path(tmp), 1.0, flags))
                else:
                    times.append(one_round(Path(tmp), mode, args.trial_seconds, flags))
        shown = " ".join(f"{t:.2f}" for t in times)
        print(f"{mode:<6} {statistics.median(times):>9.2f} {max(times):>7.2f}  {shown}")


if __name__ == "__main__":
    main()
