"""TPE's sampler processes on the agents' nodes (hyperfleet.cluster.node_samplers): a node that
offers some samples for the controller's pool, a process killed there costs only speed, and an
agent never runs more than it offered."""

from __future__ import annotations

import contextlib
import pickle
import queue
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import optuna
import psutil
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from hyperfleet.cluster.channel import ChannelListener
from hyperfleet.cluster.messages import (
    Goodbye,
    Hello,
    Joined,
    SamplerEnded,
    SamplerNews,
    SamplerSet,
    StartSampler,
    Welcome,
)
from hyperfleet.cluster.sealed import SealedConnection
from support.background import BackgroundRun
from support.nodes import (
    TOKEN,
    Agent,
    free_port,
    run_log,
    start_controller,
    wait_for_log,
    write_token,
)
from support.procs import load_trials, run_cli, wait_until

pytestmark = pytest.mark.cluster

STUDY = "node_objective-where_it_runs"
REPLICA = "hyperfleet.sampling.replica"


def node_replicas(node: str) -> list[psutil.Process]:
    """The sampler processes an agent started for ``node``."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if REPLICA in " ".join(proc.cmdline()) and (
                proc.environ().get("HYPERFLEET_TEST_NODE") == node
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@contextlib.contextmanager
def tpe_controller(
    folder: Path, n_trials: int, processes: int
) -> Iterator[tuple[BackgroundRun, list[Agent], str]]:
    """A TPE search with ``processes`` sampler processes on the controller, listening for
    agents: the controller, a list for the test's agents, and the address they join. Every
    one of them is stopped when the test ends."""
    address = f"127.0.0.1:{free_port()}"
    controller = start_controller(
        folder, address, n_trials, "--sampler", "tpe", "--sampling-processes", str(processes)
    )
    agents: list[Agent] = []
    try:
        wait_for_log(folder, "listening for agents", 30)
        yield controller, agents, address
    finally:
        controller.stop()
        for agent in agents:
            agent.stop()


def search_with_node_samplers(
    folder: Path, n_trials: int, processes: int = 1, kill_at: int | None = None
) -> list[optuna.trial.FrozenTrial]:
    """A TPE search with no sampler process on the controller, and ``processes`` on its one
    node (two slots); with ``kill_at``, they are killed once as many trials completed. Returns
    its trials, all complete."""
    with tpe_controller(folder, n_trials, 0) as (controller, agents, address):
        offer = ["--sampling-processes", str(processes)]
        agents.append(Agent(folder, address, "nodeA", 2, nap=0.1, flags=offer))
        if kill_at is not None:
            wait_for_log(folder, f"sampler processes: {processes} on node nodeA", 30)
            replicas = wait_until(lambda: node_replicas("nodeA"), 30, "the node's samplers")
            wait_until(lambda: len(_complete(folder)) >= kill_at, 60, f"{kill_at} trials")
            for replica in replicas:
                replica.send_signal(signal.SIGKILL)
        assert controller.wait(120) == 0, controller.stderr
        assert agents[0].wait(15) == 0, agents[0].log.read_text()
    trials = load_trials(folder / "run", STUDY)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials
    assert not node_replicas("nodeA")  # the agent ended its process with the run
    return trials


def _complete(folder: Path) -> list[optuna.trial.FrozenTrial]:
    try:
        trials = load_trials(folder / "run", STUDY)
    except (KeyError, ValueError, OSError):  # the study is not there yet
        return []
    return [t for t in trials if t.state == TrialState.COMPLETE]


def sets_used(log: str, where: str) -> list[int]:
    """How many sets of each process ``where`` the trials used, as the run's end says."""
    found = re.search(
        rf"sets of its sampler processes used: .*?(\d+) {where}( \(([\d, ]+)\))?", log
    )
    assert found, log
    return [int(n) for n in found.group(3).split(", ")] if found.group(3) else [int(found.group(1))]


def test_a_nodes_sampler_process_samples_for_the_controller(tmp_path: Path) -> None:
    trials = search_with_node_samplers(tmp_path, 30, processes=2)

    log = run_log(tmp_path)
    assert "sampler processes offered: 2" in log, log
    assert f"study {STUDY}: sampler processes: 2 on node nodeA" in log, log
    used = sets_used(log, "on node nodeA")
    assert len(used) == 2 and min(used) > 0, used  # each of the node's processes sampled
    assert all(t.params["x"] == t.value for t in trials)  # stored as the objective got it
    # TPE sends nothing with a trial without the pool: the values sent came from the node.
    assert sum(t.user_attrs["sent"] == ["x"] for t in trials) == sum(used)
    assert len({t.params["x"] for t in trials}) == len(trials)  # each trial its own sample


def test_a_sampler_process_killed_on_a_node_costs_only_speed(tmp_path: Path) -> None:
    trials = search_with_node_samplers(tmp_path, 40, kill_at=10)

    log = run_log(tmp_path)
    assert log.count("1 of its sampler processes died") == 1, log
    assert sets_used(log, "on node nodeA")[0] > 0
    # The last trials were sampled by the controller: TPE sends nothing then.
    assert all(not t.user_attrs["sent"] for t in trials[-10:])


def test_a_node_that_joins_a_running_pool_samples_from_the_whole_study(tmp_path: Path) -> None:
    with tpe_controller(tmp_path, 50, 1) as (controller, agents, address):
        agents.append(Agent(tmp_path, address, "nodeA", 1, nap=0.1))
        wait_for_log(tmp_path, "trial 12 complete", 60)
        agents.append(
            Agent(tmp_path, address, "nodeB", 1, nap=0.1, flags=["--sampling-processes", "1"])
        )
        assert controller.wait(120) == 0, controller.stderr
        for agent in agents:
            assert agent.wait(15) == 0, agent.log.read_text()
    trials = load_trials(tmp_path / "run", STUDY)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 50
    log = run_log(tmp_path)
    assert f"study {STUDY}: sampler processes: 1 here" in log, log
    assert f"study {STUDY}: sampler processes: 1 more on node nodeB" in log, log
    # A set sampled from a history far behind the study's is stale and dropped: those of the
    # node that joined late were used, so its process started from every trial there was.
    assert sets_used(log, "on node nodeB")[0] > 0
    assert not node_replicas("nodeB")


def test_a_node_lost_with_its_sampler_process_costs_only_speed(tmp_path: Path) -> None:
    with tpe_controller(tmp_path, 40, 0) as (controller, agents, address):
        agents.append(Agent(tmp_path, address, "nodeA", 1, nap=0.1))
        agents.append(
            Agent(tmp_path, address, "nodeB", 1, nap=0.1, flags=["--sampling-processes", "1"])
        )
        wait_until(lambda: len(_complete(tmp_path)) >= 10, 60, "10 trials")
        agents[1].kill_group()  # the agent alone: its sampler process leads its own group
        assert controller.wait(120) == 0, controller.stderr
        assert agents[0].wait(15) == 0, agents[0].log.read_text()
    trials = load_trials(tmp_path / "run", STUDY)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 40
    log = run_log(tmp_path)
    assert "node nodeB lost" in log, log
    assert log.count("1 of its sampler processes died") == 1, log
    # With its agent gone, the process read the end of its socket and exited.
    wait_until(lambda: not node_replicas("nodeB"), 10, "nodeB's sampler process to exit")


# ----- an agent and a controller played by the test --------------------------------------


@pytest.fixture
def peers() -> Iterator[tuple[queue.Queue[tuple[SealedConnection, Any]], str]]:
    """A listener in the test's place of a controller: what each agent says first, and its
    address."""
    met: queue.Queue[tuple[SealedConnection, Any]] = queue.Queue()
    listener = ChannelListener(
        ("127.0.0.1", 0),
        TOKEN.encode(),
        lambda conn, first, _where: met.put((conn, first)),
        lambda _where, _reason: None,
    )
    try:
        yield met, f"127.0.0.1:{listener.address[1]}"
    finally:
        listener.close()


def welcomed(met: queue.Queue[tuple[SealedConnection, Any]], folder: Path) -> tuple[Any, Hello]:
    conn, hello = met.get(timeout=30)
    assert isinstance(hello, Hello)
    conn.send(Welcome(1.0, 10.0, str(folder / "no-run"), "no-id"))
    assert conn.poll(10) and isinstance(conn.recv(), Joined)
    return conn, hello


def next_of(conn: SealedConnection, kind: type) -> Any:
    """The agent's next message of ``kind`` (its beats and readings go by)."""
    while conn.poll(30):
        message = conn.recv()
        if isinstance(message, kind):
            return message
    raise AssertionError(f"no {kind.__name__} from the agent")


def setup_for(index: int) -> bytes:
    """A sampler process's first message, as a pool sends it."""
    sampler = optuna.samplers.TPESampler(seed=1)
    setup = {"sampler": cloudpickle.dumps(sampler), "directions": ["MINIMIZE"], "index": index}
    return pickle.dumps(setup)


def say_goodbye(conn: SealedConnection, agent: Agent) -> None:
    conn.send(Goodbye())
    assert agent.wait(15) == 0, agent.log.read_text()


def test_an_agent_runs_no_more_sampler_processes_than_it_offered(
    peers: tuple[queue.Queue[tuple[SealedConnection, Any]], str], tmp_path: Path
) -> None:
    met, address = peers
    write_token(tmp_path)
    agent = Agent(tmp_path, address, "nodeB", 1, flags=["--sampling-processes", "2"])
    try:
        conn, hello = welcomed(met, tmp_path)
        assert hello.sampling_processes == 2
        conn.send(StartSampler(7, setup_for(0)))
        conn.send(StartSampler(8, setup_for(1)))
        news = ("batch", [("trials", []), ("space", 1, {"x": FloatDistribution(0.0, 1.0)})])
        conn.send(SamplerNews((7, 8), pickle.dumps(news)))  # one copy for both
        made = {}
        while len(made) < 2:  # each process sampled, the agent relayed
            sampled = next_of(conn, SamplerSet)
            made.setdefault(sampled.sampler, pickle.loads(sampled.payload))
        assert {sampler: made[sampler][:3] for sampler in made} == {
            7: ("set", (0, 0), 1),
            8: ("set", (1, 0), 1),
        }
        conn.send(StartSampler(9, setup_for(2)))
        refused = next_of(conn, SamplerEnded)
        assert refused.sampler == 9 and refused.reason.startswith("refused"), refused
        assert len(node_replicas("nodeB")) == 2
        say_goodbye(conn, agent)
    finally:
        agent.stop()
    assert not node_replicas("nodeB")  # the goodbye ended it
    assert "refused a sampler process" in agent.log.read_text()


def test_an_agent_that_offered_none_refuses_a_start(
    peers: tuple[queue.Queue[tuple[SealedConnection, Any]], str], tmp_path: Path
) -> None:
    met, address = peers
    write_token(tmp_path)
    agent = Agent(tmp_path, address, "nodeC", 1)
    try:
        conn, hello = welcomed(met, tmp_path)
        assert hello.sampling_processes == 0
        conn.send(StartSampler(3, setup_for(0)))
        refused = next_of(conn, SamplerEnded)
        assert refused.sampler == 3 and "offers 0 sampler processes" in refused.reason
        say_goodbye(conn, agent)
    finally:
        agent.stop()
    assert not node_replicas("nodeC")
    assert "refused a sampler process" in agent.log.read_text()


def test_an_agent_asked_for_fewer_than_no_sampler_processes_says_what_to_pass(
    tmp_path: Path,
) -> None:
    args = ["agent", "--connect", "127.0.0.1:1", "--sampling-processes", "-1"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--sampling-processes -1 must be 0 or more" in result.stderr
