"""The agents' channel under attack: a peer in the middle, an impostor controller, a reflected
proof, another build, a flood of connections, silent peers and careless token files."""

from __future__ import annotations

import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.app.cli import main
from hyperfleet.cluster import sealed
from hyperfleet.cluster.channel import (
    MAX_HANDSHAKES,
    ChannelListener,
    connect,
    controller_token,
    read_token,
)
from hyperfleet.cluster.messages import PROTOCOL, Hello
from hyperfleet.cluster.trialfiles import TrialLogs, trial_folder, write_logs
from hyperfleet.errors import ConfigError, NodeError
from hyperfleet.resources.inventory import Inventory
from support.background import BackgroundRun
from support.nodes import OBJECTIVE, free_port, wait_for_log
from support.procs import cpu_only_env, wait_until

TOKEN = b"the-run-token-0123456789"


class Listener:
    """A real listener, with what it was given and what it refused."""

    def __init__(self, token: bytes = TOKEN) -> None:
        self.peers: list[tuple[Any, Any]] = []
        self.refused: list[tuple[str, str]] = []
        self.joined = threading.Event()
        self.listener = ChannelListener(("127.0.0.1", 0), token, self._peer, self._refuse)
        self.address = self.listener.address

    def _peer(self, conn: Any, first: Any, where: str) -> None:
        self.peers.append((conn, first))
        self.joined.set()

    def _refuse(self, where: str, reason: str) -> None:
        self.refused.append((where, reason))

    def close(self) -> None:
        self.listener.close()
        for conn, _ in self.peers:
            conn.close()


@pytest.fixture
def listener() -> Any:
    made = Listener()
    yield made
    made.close()


class Evil:
    """Something that makes a file when it is unpickled: the proof that a pickle was read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def _frame(payload: bytes) -> bytes:
    """One message as ``multiprocessing.connection`` frames it."""
    return struct.pack("!i", len(payload)) + payload


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the peer hung up"
        data += chunk
    return data


def test_a_peer_in_the_middle_cannot_speak_for_the_agent_it_relays(
    listener: Listener, tmp_path: Path
) -> None:
    """An agent pointed at the wrong address: that server relays the handshake between it and
    the real controller, then sends a pickle of its own. The controller never unpickles it."""
    proof = tmp_path / "unpickled"
    middle = socket.create_server(("127.0.0.1", 0))
    relayed = threading.Event()

    def relay() -> None:
        agent_side, _ = middle.accept()
        with agent_side, socket.create_connection(listener.address) as controller_side:
            hello = _read_exactly(agent_side, sealed.HELLO_BYTES)
            controller_side.sendall(hello)
            agent_side.sendall(_read_exactly(controller_side, sealed.REPLY_BYTES))
            controller_side.sendall(_read_exactly(agent_side, sealed.PROOF_BYTES))
            agent_side.sendall(_read_exactly(controller_side, 1))
            controller_side.sendall(_frame(pickle.dumps(Evil(proof))))  # instead of the agent's
            relayed.set()
            controller_side.settimeout(10)
            assert controller_side.recv(1) == b""  # the controller hung up on it

    thread = threading.Thread(target=relay)
    thread.start()
    agent = connect(middle.getsockname()[:2], TOKEN, patience=5)
    thread.join(15)
    agent.close()
    middle.close()
    assert relayed.is_set()
    wait_until(lambda: listener.refused, 10, "the refusal")
    assert not proof.exists() and not listener.peers
    assert listener.refused[0][1] == "its first message was not sealed with this run's token"


def test_an_agent_proves_nothing_to_a_server_that_cannot_prove_it_holds_the_token() -> None:
    """A squatted port: the impostor answers the hello with a proof made without the token.
    The agent stops there; all the impostor ever got is the hello (a nonce, no proof)."""
    impostor = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def pretend() -> None:
        peer, _ = impostor.accept()
        with peer:
            hello = _read_exactly(peer, sealed.HELLO_BYTES)
            head = sealed.ACCEPTED + hello[8 : 8 + sealed.PROTOCOL_BYTES] + b"n" * 32
            peer.sendall(head + b"p" * sealed.PROOF_BYTES)
            received.append(hello)
            peer.settimeout(10)
            while chunk := peer.recv(4096):
                received.append(chunk)

    thread = threading.Thread(target=pretend)
    thread.start()
    with pytest.raises(NodeError, match="does not prove it holds this agent's token"):
        connect(impostor.getsockname()[:2], TOKEN, patience=5)
    thread.join(15)
    impostor.close()
    assert received[0].startswith(sealed.MAGIC) and len(received[0]) == sealed.HELLO_BYTES
    assert b"".join(received[1:]) == sealed.UNPROVEN  # a refusal, not a proof


def test_a_controllers_proof_sent_back_to_it_is_refused(listener: Listener) -> None:
    """Reflection: the only proof a stranger can get from a controller is the controller's own,
    and it is bound to the direction it was made for."""
    with socket.create_connection(listener.address) as stranger:
        stranger.sendall(sealed.MAGIC + sealed._pad(PROTOCOL) + b"n" * sealed.NONCE_BYTES)
        reply = _read_exactly(stranger, sealed.REPLY_BYTES)
        stranger.sendall(reply[-sealed.PROOF_BYTES :])
        assert _read_exactly(stranger, 1) == sealed.REFUSED
    wait_until(lambda: listener.refused, 10, "the refusal")
    assert listener.refused == [(listener.refused[0][0], "it does not hold this run's token")]


def test_the_right_token_joins_and_messages_travel_sealed_both_ways(listener: Listener) -> None:
    agent = connect(listener.address, TOKEN, patience=5)
    agent.send({"hello": 1})
    assert listener.joined.wait(10)
    controller, first = listener.peers[0]
    assert first == {"hello": 1}
    controller.send("welcome")
    assert agent.poll(5) and agent.recv() == "welcome"
    agent.close()


def test_an_agent_of_another_build_is_refused_in_one_line_naming_both_versions(
    listener: Listener,
) -> None:
    with socket.create_connection(listener.address) as old:
        old.settimeout(10)
        with pytest.raises(sealed.HandshakeRefused) as refused:
            sealed.connector_handshake(old, TOKEN, "0.0.9+0123456789", time.monotonic() + 10)
    assert f"protocol {PROTOCOL}, this agent 0.0.9+0123456789" in refused.value.reason
    wait_until(lambda: listener.refused, 10, "the refusal")
    reason = listener.refused[0][1]
    assert f"protocol 0.0.9+0123456789, this controller {PROTOCOL}" in reason


def test_a_flood_of_silent_connections_costs_bounded_threads_and_real_agents_still_join(
    listener: Listener,
) -> None:
    threads_before = threading.active_count()
    flood = [socket.create_connection(listener.address) for _ in range(300)]
    try:
        wait_until(lambda: any("shed" in r for _, r in listener.refused), 10, "a shed peer")
        assert threading.active_count() - threads_before <= MAX_HANDSHAKES
    finally:
        for sock in flood:
            sock.close()
    agent = connect(listener.address, TOKEN, patience=30)
    agent.send("hello")
    assert listener.joined.wait(10)
    agent.close()
    # Told a few at a time, then counted: a flood does not fill the run log.
    wait_until(lambda: any(w.endswith("more peers") for w, _ in listener.refused), 10, "a count")
    assert len(listener.refused) < 50


LISTENER_WITH_FEW_DESCRIPTORS = """
import os, resource, sys, threading
from hyperfleet.cluster.channel import ChannelListener
joined, starved, refused = threading.Event(), threading.Event(), []
def refuse(where, reason):
    refused.append(reason)
    if "Too many open files" in reason:
        starved.set()
listener = ChannelListener(("127.0.0.1", 0), b"%s", lambda c, f, w: joined.set(), refuse)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 6,) * 2)
print(listener.address[1], flush=True)
print("starved" if starved.wait(30) else "never starved", flush=True)
sys.stdin.readline()  # the flood is over
print("joined" if joined.wait(30) else "deaf", flush=True)
"""


def test_a_controller_out_of_descriptors_keeps_accepting_once_they_are_back() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", LISTENER_WITH_FEW_DESCRIPTORS % TOKEN.decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    port = int(child.stdout.readline())
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    assert child.stdout.readline().strip() == "starved"  # accept() failed: EMFILE
    for sock in flood:
        sock.close()
    child.stdin.write("\n")
    child.stdin.flush()
    agent = connect(("127.0.0.1", port), TOKEN, patience=30)
    agent.send("hello")
    assert child.stdout.readline().strip() == "joined"
    agent.close()
    assert child.wait(10) == 0


def test_an_agent_gives_up_on_a_peer_that_accepts_and_says_nothing(tmp_path: Path) -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    port = silent.getsockname()[1]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hyperfleet.app.cli", "agent", "--connect", f"127.0.0.1:{port}",
         "--token-file", str(token), "--patience", "2s", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    silent.close()
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 20
    assert "never finished hyperfleet's handshake" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_token_file_others_may_read_or_not_text_is_refused(tmp_path: Path) -> None:
    open_file = tmp_path / "open"
    open_file.write_text("abc\n")
    open_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"may be read by other users .*chmod 600"):
        read_token(open_file)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00token")
    binary.chmod(0o600)
    with pytest.raises(ConfigError, match="does not hold a token"):
        read_token(binary)
    assert main(["agent", "--connect", "127.0.0.1:1", "--token-file", str(binary)]) == 2


def test_a_run_directory_token_made_readable_by_others_is_refused_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYPERFLEET_TOKEN", raising=False)
    _, path = controller_token(None, tmp_path)
    assert path is not None
    path.chmod(0o666)
    with pytest.raises(ConfigError, match="may be read by other users"):
        controller_token(None, tmp_path)


def test_node_logs_never_leave_the_run_directory_through_a_link(tmp_path: Path) -> None:
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    (run_dir / "trials").symlink_to(elsewhere)
    logs = TrialLogs("trials/00003", {"stdout.log": b"x"})
    assert trial_folder(run_dir, logs) is None
    # A link made after the check, at the log itself or at its folder: nothing goes through.
    (run_dir / "trials").unlink()
    (run_dir / "trials" / "00003").mkdir(parents=True)
    (run_dir / "trials" / "00003" / "stdout.log").symlink_to(elsewhere / "stolen")
    write_logs(run_dir, run_dir / "trials" / "00003", {"stdout.log": b"x", "stderr.log": b"y"})
    assert not (elsewhere / "stolen").exists()
    assert (run_dir / "trials" / "00003" / "stderr.log").read_bytes() == b"y"


def test_a_controller_on_every_interface_names_its_host_and_warns_and_survives_a_half_join(
    tmp_path: Path,
) -> None:
    """``--listen 0.0.0.0``: the printed command names this host, with a warning; a peer that
    hangs up between its hello and joining is refused in one line; a run stopped before its
    study opened keeps the run directory's token, so agents given it are still let in."""
    port = free_port("0.0.0.0")
    args = [
        "run", f"{OBJECTIVE}:where_it_runs", "--n-trials", "2", "--run-dir", "run",
        "--listen", f"0.0.0.0:{port}", "--cpu-slots", "0", "--plain", "--no-report",
    ]  # fmt: skip
    env = {k: v for k, v in cpu_only_env().items() if k != "HYPERFLEET_TOKEN"}
    controller = BackgroundRun(args, tmp_path, env, name="controller")
    try:
        wait_for_log(tmp_path, "listening for agents", 30)
        token = read_token(tmp_path / "run" / "agent.token")
        half = connect(("127.0.0.1", port), token, patience=10)
        half.send(Hello("halfway", Inventory(gpus=(), cores=(0,)), 1))
        half.close()
        wait_for_log(tmp_path, "node halfway did not answer the welcome", 30)
        controller.process.send_signal(signal.SIGINT)
        assert controller.wait(30) != 0
    finally:
        controller.stop()
    log = controller.stdout  # the run log went with the run directory, all but the token
    host = socket.gethostname()
    assert f"hyperfleet agent --connect {host}:{port} --token-file" in log
    assert "warning: listening on every interface (0.0.0.0)" in log
    assert "Traceback" not in controller.stderr, controller.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["agent.token"]
    assert read_token(tmp_path / "run" / "agent.token") == token
