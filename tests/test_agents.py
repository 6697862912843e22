"""Agents started by hand, each playing a node with fake GPUs: a search uses every slot of
every node, pinned as on one machine; a node killed or stopped loses only its own trials,
which run again elsewhere; strangers are refused without disturbing the run."""

from __future__ import annotations

import collections
import contextlib
import json
import random
import signal
import socket
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

import hyperfleet
from hyperfleet.cluster.channel import connect
from hyperfleet.cluster.trialfiles import (
    COPIED_LOG_BYTES,
    TrialLogs,
    collect_logs,
    trial_folder,
)
from hyperfleet.errors import NodeError
from support.netns import Network, network
from support.nodes import (
    OBJECTIVE,
    Agent,
    can_hide_folders,
    free_port,
    node_processes,
    run_log,
    start_controller,
    unseen_by_controller,
    wait_for_log,
    write_token,
)
from support.procs import load_trials, wait_until

pytestmark = pytest.mark.cluster

STUDY = "node_objective-where_it_runs"
NODES = (("nodeA", 2), ("nodeB", 1))
TIMEOUT = 2  # seconds a node may be silent: short, so that the tests are
RETRY = "hyperfleet.retry_of"


def _trials(folder: Path) -> list:
    return load_trials(folder / "run", STUDY)


def _read_until_closed(sock: socket.socket, timeout: float) -> bool:
    """True when the controller closes the connection within ``timeout`` seconds."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def test_a_search_uses_every_slot_of_every_node_and_refuses_strangers(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The random sampler: its suggestions travel with each trial through the agents.
    controller = start_controller(tmp_path, address, 12, "--sampler", "random")
    agents: list[Agent] = []
    silent = socket.socket()
    try:
        wait_for_log(tmp_path, "listening for agents", 30)
        silent.connect(("127.0.0.1", port))  # connects and says nothing
        with pytest.raises(NodeError, match=r"does not prove it holds this agent's token"):
            connect(("127.0.0.1", port), b"not the token", patience=5)
        with socket.create_connection(("127.0.0.1", port)) as garbage:
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" * 50)
            assert _read_until_closed(garbage, 5)
        socket.create_connection(("127.0.0.1", port)).close()  # a stray connection
        agents = [Agent(tmp_path, address, node, gpus, nap=1.5) for node, gpus in NODES]
        assert _read_until_closed(silent, 10), "a silent peer was not cut off"
        assert controller.wait(120) == 0, controller.stderr
        for agent in agents:
            assert agent.wait(15) == 0, agent.log.read_text()
    finally:
        silent.close()
        controller.stop()
        for agent in agents:
            agent.stop()
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 12
    slots = {t.user_attrs["slot"] for t in trials}
    assert slots == {"nodeA/gpu0#0", "nodeA/gpu1#0", "nodeB/gpu0#0"}
    # Only the trials started before any had completed (one per slot at most) asked for x.
    assert sum(t.user_attrs["sent"] == ["x"] for t in trials) >= 12 - len(slots)
    assert all(t.params["x"] == t.value for t in trials)  # stored as the objective got it
    for trial in trials:
        node, _, local = trial.user_attrs["slot"].partition("/")
        assert trial.user_attrs["node"] == node
        assert trial.user_attrs["cuda_visible_devices"] == f"GPU-fake-{local[len('gpu')]}"
        assert trial.user_attrs["affinity"] == trial.user_attrs["slot_cores"]
    log = run_log(tmp_path)
    assert "node nodeA joined" in log and "node nodeB joined" in log
    # A wrong token, garbage, a stray connection and a silent peer, while the run went on.
    assert log.count("refused a connection") == 4, log
    assert "does not hold this run's token" in log
    assert not node_processes("nodeA") and not node_processes("nodeB")


def _lose_node_b(agent: Agent, how: str, network: Network | None) -> None:
    if how == "kill":
        agent.kill_group()  # the agent and nothing else: its workers lead their own groups
    elif how == "stop":
        agent.process.send_signal(signal.SIGSTOP)
    else:
        assert network is not None
        network.cut("nodeB")  # packets stop; neither side sees the connection close


@pytest.mark.parametrize("how", ["kill", "stop", "cut"])
def test_a_lost_node_loses_only_its_trials_which_run_again_elsewhere(
    tmp_path: Path, how: str
) -> None:
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(network(["nodeA", "nodeB"])) if how == "cut" else None
        _lose_a_node(tmp_path, how, net)


def _lose_a_node(folder: Path, how: str, net: Network | None) -> None:
    host = net.controller_ip if net is not None else "127.0.0.1"
    address = f"{host}:{free_port(host)}"
    timing = ("--heartbeat", "0.4s", "--node-timeout", f"{TIMEOUT}s")
    controller = start_controller(folder, address, 6, *timing)
    # nodeB tries to join again for 2 s once it finds its controller gone, then leaves.
    a, b = (
        Agent(
            folder, address, node, 2, net.prefix(node) if net is not None else (), nap=1.5,
            flags=("--patience", "2s"),
        )
        for node in ("nodeA", "nodeB")
    )  # fmt: skip
    try:
        wait_for_log(folder, "started on nodeB/", 60)
        _lose_node_b(b, how, net)
        lost_at = time.monotonic()
        # EOF at once for a killed agent; the node timeout for a stopped or cut-off one.
        wait_for_log(folder, "lost: node nodeB", TIMEOUT + 3)
        # run.log lines are flushed once a second: the bound has that second on top.
        assert time.monotonic() - lost_at < (2 if how == "kill" else TIMEOUT + 2)
        if how == "cut":  # the agent hears nothing either, stops its workers, cannot rejoin
            assert b.wait(TIMEOUT + 3 + 2) == 1
            assert "sent nothing" in b.log.read_text()
            assert "could not join it again" in b.log.read_text()
        assert controller.wait(120) == 0, controller.stderr
        assert a.wait(15) == 0
        if how == "stop":
            b.process.send_signal(signal.SIGCONT)  # it finds its controller gone and leaves
            assert b.wait(10 + 2) == 1
            assert "controller" in b.log.read_text()
        wait_until(lambda: not node_processes("nodeB"), 10, "nodeB's workers to exit")
    finally:
        controller.stop()
        a.stop()
        b.stop()
    _check_lost_trials_ran_again(folder)


def test_a_node_whose_link_comes_back_joins_again_and_takes_trials(tmp_path: Path) -> None:
    """A cut link: both sides give each other up within the node timeout; once the link is back,
    the agent, still trying to join, is taken back with fresh workers, nobody restarting it."""
    with network(["A", "B"]) as net:
        address = f"{net.controller_ip}:{free_port(net.controller_ip)}"
        timing = ("--heartbeat", "0.4s", "--node-timeout", f"{TIMEOUT}s")
        controller = start_controller(tmp_path, address, 24, *timing)
        a, b = (Agent(tmp_path, address, node, 1, net.prefix(node), nap=1.0) for node in "AB")
        try:
            wait_for_log(tmp_path, "started on B/", 60)
            net.cut("B")
            wait_until(lambda: "trying to join it again" in b.log.read_text(), 10, "B to wait")
            wait_for_log(tmp_path, "node B lost", 5)
            net.heal("B")
            healed = time.monotonic()
            wait_until(lambda: run_log(tmp_path).count("node B joined") == 2, 20, "B back")
            assert time.monotonic() - healed < 15
            assert controller.wait(120) == 0, controller.stderr
            assert a.wait(15) == 0 and b.wait(15) == 0
        finally:
            controller.stop()
            a.stop()
            b.stop()
    trials = _trials(tmp_path)
    assert collections.Counter(t.state for t in trials)[TrialState.COMPLETE] == 24
    rejoined_at = max(t.number for t in trials if t.state == TrialState.FAIL)
    assert any(t.user_attrs["slot"].startswith("B/") for t in trials if t.number > rejoined_at), (
        "no trial ran on B after it came back"
    )


def _check_lost_trials_ran_again(folder: Path) -> None:
    trials = _trials(folder)
    states = collections.Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == 6
    assert states[TrialState.RUNNING] == 0
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "no trial was lost"
    for trial in failed:
        assert trial.system_attrs["hyperfleet:fail_kind"] == "lost"
        assert "node nodeB" in trial.system_attrs["hyperfleet:fail_reason"]
        assert trial.user_attrs.get("slot", "nodeB/").startswith("nodeB/")
    repeats = [t.user_attrs[RETRY] for t in trials if RETRY in t.user_attrs]
    assert sorted(repeats) == sorted(t.number for t in failed)  # each once, none twice
    after_loss = [t for t in trials if t.number > max(t.number for t in failed)]
    assert all(t.user_attrs["slot"].startswith("nodeA/") for t in after_loss)


CAMPAIGN = """
[campaign]
name = "multi"
run_dir = "run"
listen = "{address}"

[pool]
trials_per_gpu = 2
cpu_slots = 1

[defaults]
n_trials = 16
direction = "maximize"

[[study]]
name = "half"
objective = "{objective}:where_it_runs"
slot = {{ gpus = 0.5 }}

[[study]]
name = "cpu"
objective = "{objective}:where_it_runs"
slot = "cpu"
"""


def test_a_campaign_file_that_listens_uses_every_slot_of_every_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYPERFLEET_TEST_NAP", "0.2")
    campaign = tmp_path / "campaign.toml"
    address = f"127.0.0.1:{free_port()}"
    campaign.write_text(CAMPAIGN.format(objective=OBJECTIVE, address=address))
    token = write_token(tmp_path)
    agents = [Agent(tmp_path, address, node, 1) for node in ("nodeA", "nodeB")]
    try:
        outcome = hyperfleet.run_campaign(campaign, token_file=token, display="quiet", report=False)
        for agent in agents:
            assert agent.wait(15) == 0, agent.log.read_text()
    finally:
        for agent in agents:
            agent.stop()
    assert outcome.status == "completed", outcome.message
    used = {}
    for study in outcome.studies:
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 16
        used[study.study_name] = {t.user_attrs["slot"] for t in trials}
        for trial in trials:
            assert trial.user_attrs["node"] == trial.user_attrs["slot"].partition("/")[0]
    # Every slot of every node, each study on its own shape.
    assert used["half"] == {f"{n}/gpu0#{k}" for n in ("nodeA", "nodeB") for k in (0, 1)}
    assert used["cpu"] == {"nodeA/cpu#0", "nodeB/cpu#0"}


def test_a_node_without_the_run_directory_runs_trials_whose_logs_come_back(
    tmp_path: Path,
) -> None:
    if not can_hide_folders():
        pytest.skip("a node without the shared disk needs root and unshare (a mount namespace)")
    address = f"127.0.0.1:{free_port()}"
    controller = start_controller(tmp_path, address, 4, "--retry", "crash=1")
    wait_for_log(tmp_path, "listening for agents", 30)
    # A node of its own mount namespace, where the run directory is an empty disk. It joins
    # first, so it certainly runs trials; the first of them kills its worker.
    hidden = [*unseen_by_controller(tmp_path / "run"),
              "env", f"HYPERFLEET_TEST_CRASH_ONCE={tmp_path / 'crashed'}"]  # fmt: skip
    agents = [Agent(tmp_path, address, "nodeX", 1, hidden)]
    try:
        wait_for_log(tmp_path, "node nodeX joined", 30)
        agents.append(Agent(tmp_path, address, "nodeA", 1, nap=2.0))  # nodeX runs the most
        assert controller.wait(120) == 0, controller.stderr
        for agent in agents:
            assert agent.wait(15) == 0, agent.log.read_text()
    finally:
        controller.stop()
        for agent in agents:
            agent.stop()
    (own,) = (tmp_path / "hyperfleet-agent-runs").iterdir()  # the node's own run folder
    notice = (
        f"run folder not shared; trial logs copied back, objective files stay in {own} on nodeX"
    )
    assert notice in agents[0].log.read_text()
    log = run_log(tmp_path)
    assert notice in log and "it shares the run directory" in log
    (crashed,) = [t for t in _trials(tmp_path) if t.state == TrialState.FAIL]
    trials = [t for t in _trials(tmp_path) if t.state != TrialState.FAIL]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    # What the dead trial wrote came back before its end was recorded: result.json quotes it.
    folder = tmp_path / "run" / "trials" / f"{crashed.number:05d}"
    dying = f"trial {crashed.number} dies on nodeX\n"
    assert (folder / "stderr.log").read_text() == dying
    result = json.loads((folder / "result.json").read_text())
    assert result["fail_kind"] == "crash" and result["slot"] == "nodeX/gpu0#0"
    assert dying.strip() in result["stderr_tail"]
    assert any(t.user_attrs["node"] == "nodeX" for t in trials), "nodeX completed no trial"
    for trial in trials:
        folder = tmp_path / "run" / "trials" / f"{trial.number:05d}"
        node = trial.user_attrs["node"]
        x = trial.params["x"]
        assert (folder / "stdout.log").read_text() == f"trial {trial.number}: x={x!r}\n"
        assert (folder / "stderr.log").read_text() == f"trial {trial.number} ran on {node}\n"
        assert json.loads((folder / "params.json").read_text()) == {"x": x}
        result = json.loads((folder / "result.json").read_text())
        assert result["state"] == "COMPLETE" and result["values"] == [x]
        # The objective's own files stay where it ran.
        stays = own / "trials" / folder.name if node == "nodeX" else folder
        assert (stays / "model.txt").read_text() == f"{x!r}\n"
        assert (folder / "model.txt").exists() == (node == "nodeA")


def test_a_huge_log_comes_back_as_its_end_with_a_note(tmp_path: Path) -> None:
    trial = tmp_path / "trials" / "00003"
    trial.mkdir(parents=True)
    (trial / "stdout.log").write_bytes(b"a" * 10 + b"b" * COPIED_LOG_BYTES)
    (trial / "stderr.log").write_bytes(b"short\n")
    logs = collect_logs(tmp_path, "trials/00003", "node3")
    where = trial / "stdout.log"
    note = f"[hyperfleet: the first 10 bytes of this log are left out; see {where} on node3]\n"
    assert logs.logs["stdout.log"] == note.encode() + b"b" * COPIED_LOG_BYTES
    assert logs.logs["stderr.log"] == b"short\n"


def test_logs_a_node_sends_go_only_into_the_run_directory(tmp_path: Path) -> None:
    assert trial_folder(tmp_path, TrialLogs("trials/00003", {"stderr.log": b""})) == (
        tmp_path / "trials" / "00003"
    )
    for folder, logs in [
        ("../elsewhere", {"stdout.log": b""}),
        ("/etc", {"stdout.log": b""}),
        ("trials/00003", {"params.json": b"{}"}),
        ("trials/00003", {"stdout.log": "not bytes"}),
    ]:
        assert trial_folder(tmp_path, TrialLogs(folder, logs)) is None  # type: ignore[arg-type]


def test_a_controller_killed_at_any_moment_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """The kill loop of a single machine, with agents: SIGKILL the controller at random
    moments and start it again, until the budget is reached. The agent is started once: each
    time its controller dies it stops its workers and joins the controller run again."""
    address = f"127.0.0.1:{free_port()}"
    rng = random.Random(12)
    agent = Agent(tmp_path, address, "nodeA", 2, nap=0.4)
    try:
        for round_number in range(3):
            controller = start_controller(tmp_path, address, 10)
            try:
                if round_number < 2:
                    done = _completed_in_log(tmp_path) + rng.randint(1, 3)
                    wait_until(lambda d=done: _completed_in_log(tmp_path) >= d, 60, "completions")
                    controller.kill()
                    wait_until(
                        lambda r=round_number: _rejoins(agent) == r + 1, 10, "a try to rejoin"
                    )
                    wait_until(lambda: not node_processes("nodeA"), 10, "nodeA's workers to exit")
                    assert agent.process.poll() is None  # it waits for its controller
                else:
                    assert controller.wait(120) == 0, controller.stderr
                    assert agent.wait(15) == 0
            finally:
                controller.stop()
    finally:
        agent.stop()
    assert agent.log.read_text().count("joined 127.0.0.1") == 3
    trials = _trials(tmp_path)
    states = collections.Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == 10 and states[TrialState.RUNNING] == 0
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "no kill landed while a trial ran"
    for trial in failed:
        assert trial.system_attrs["hyperfleet:fail_kind"] == "interrupted"
    repeats = [t.user_attrs[RETRY] for t in trials if RETRY in t.user_attrs]
    assert sorted(repeats) == sorted(t.number for t in failed)  # each once, none twice


def _rejoins(agent: Agent) -> int:
    return agent.log.read_text().count("trying to join it again")


def _completed_in_log(folder: Path) -> int:
    return run_log(folder).count(" complete on ")


def test_a_run_no_node_joins_says_what_it_waits_for_and_keeps_its_timeout(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    controller = start_controller(tmp_path, address, 4, "--timeout", "11s")
    try:
        assert controller.wait(60) == 1, controller.stderr
    finally:
        controller.stop()
    assert "still waiting after 10s: no node has joined" in controller.stdout
    assert "run failed: the run's timeout passed before any trial could start" in (
        controller.stderr
    )


def test_a_node_the_run_cannot_use_is_told_why_and_its_agent_leaves(tmp_path: Path) -> None:
    """Not a lost controller: the agent does not keep joining again, it exits saying why."""
    address = f"127.0.0.1:{free_port()}"
    controller = start_controller(tmp_path, address, 2, "--timeout", "4s")  # --cpu-slots 0
    agent = Agent(tmp_path, address, "empty", 0)  # and no GPU: nothing could run a trial
    try:
        assert agent.wait(30) == 1
        assert controller.wait(30) == 1
    finally:
        agent.stop()
        controller.stop()
    log = agent.log.read_text()
    assert "the controller refused this node: node empty is not used: cpu_slots=0" in log
    assert "trying to join it again" not in log
    assert "every node that joined was not used (empty; the run log says why)" in (
        controller.stderr
    )
