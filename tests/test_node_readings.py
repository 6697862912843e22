"""A node's readings reach the controller: agents started by hand on fake GPUs whose readings
follow the trials (``hyperfleet.resources.fakegpu``) send them, and a remote slot's GPU use and
memory show in the live view (drawn to a terminal), in status.json and in ``hyperfleet
status``, as the controller's own machine's do; auto packing grows a node's GPU from them."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState
from rich.console import Console

from hyperfleet.app.status import format_status, status
from hyperfleet.cluster.readings import STALE_PROBLEM
from hyperfleet.display.render import render
from hyperfleet.display.runstate import NodeView, RunState, SlotView
from hyperfleet.resources import inventory
from hyperfleet.resources.monitor import GpuSample
from support.background import BackgroundRun
from support.nodes import OBJECTIVE, Agent, free_port, node_processes, run_log, write_token
from support.procs import cli_command, cpu_only_env, load_trials, wait_until

pytestmark = pytest.mark.cluster

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A trial takes 3000 MiB of its fake GPU (16 GiB) and keeps it 40 % busy.
TRIAL_ENV = {"HYPERFLEET_TEST_MIB": "3000", "HYPERFLEET_TEST_BUSY": "40"}


class Terminal:
    """A command whose stdout is a terminal (so ``hyperfleet run`` draws its live view), and
    what it drew, read until it exits."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        main, screen = pty.openpty()
        self.process = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=screen, stderr=screen
        )
        os.close(screen)
        self._main = main
        self._drawn: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._main, 65536)
            except OSError:  # EIO: the command exited and its end of the terminal closed
                break
            if not chunk:
                break
            self._drawn.append(chunk)

    def text(self) -> str:
        """What it drew, without colours and cursor moves."""
        return ANSI.sub("", b"".join(self._drawn).decode(errors="replace"))

    def wait(self, timeout: float) -> int:
        wait_until(lambda: self.process.poll() is not None, timeout, "the run to exit")
        self._reader.join(timeout=5)
        os.close(self._main)
        return self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _status_json(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _node_gpu(folder: Path, node: str, index: int) -> dict[str, Any] | None:
    nodes = {n["name"]: n for n in _status_json(folder).get("nodes", [])}
    gpus = {g["index"]: g for g in nodes.get(node, {}).get("gpus", [])}
    return gpus.get(index)


def test_a_remote_slots_gpu_use_reaches_the_live_view_and_status(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {**cpu_only_env(), "COLUMNS": "160", "LINES": "60"}
    run = cli_command(
        "run", f"{OBJECTIVE}:on_its_gpu", "--n-trials", "3", "--run-dir", "run",
        "--listen", address, "--token-file", str(write_token(tmp_path)), "--cpu-slots", "0",
        "--no-report",
    )  # fmt: skip
    controller = Terminal(run, tmp_path, env)
    fake_gpus = {inventory.FAKE_GPU_DIR_ENV: str(tmp_path / "fake-gpus-rnode"), **TRIAL_ENV}
    agent = Agent(tmp_path, address, "rnode", 1, nap=2.0, env=fake_gpus)
    try:

        def trial_seen_on_its_gpu() -> bool:
            gpu = _node_gpu(tmp_path, "rnode", 0)
            return gpu is not None and gpu["memory_used_mib"] == 3000

        wait_until(trial_seen_on_its_gpu, 30, "rnode's GPU reading in status.json")
        gpu = _node_gpu(tmp_path, "rnode", 0)
        assert gpu == {
            "index": 0,
            "utilization_pct": 40.0,
            "memory_used_mib": 3000,
            "memory_total_mib": 16384,
            "problem": "",
        }
        node = _status_json(tmp_path)["nodes"][0]
        assert node["state"] == "joined" and node["cores"] == len(os.sched_getaffinity(0))
        assert 0 < node["memory_used_mib"] < node["memory_total_mib"]
        text = format_status(status(tmp_path / "run"))
        assert re.search(r"rnode +joined +1 slot, \d+% busy; cpu \d+% of \d+, memory ", text), text
        assert "gpu0 40% 2.9/16G" in text, text
        assert controller.wait(60) == 0, controller.text()
        assert agent.wait(15) == 0, agent.log.read_text()
    finally:
        controller.stop()
        agent.stop()
    drawn = controller.text()
    # The remote slot's row and the node's, as the live view drew them while trials ran.
    assert re.search(r"rnode/gpu0#0 +busy .*gpu0 40% 2\.9/16G", drawn), drawn[-3000:]
    assert re.search(r"rnode +joined +1 .*gpu0 40% 2\.9/16G", drawn), drawn[-3000:]
    assert not node_processes("rnode")


def test_auto_packing_grows_a_remote_nodes_gpu_from_its_readings(tmp_path: Path) -> None:
    # As on one machine (test_autopack): each trial keeps the GPU 22 % busy with 1000 MiB, so
    # the node's GPU has room for more than one worker.
    address = f"127.0.0.1:{free_port()}"
    fake_gpus = {inventory.FAKE_GPU_DIR_ENV: str(tmp_path / "fake-gpus-rnode")}
    # The controller judges from its own environment whether fake GPUs read anything.
    controller_env = {**cpu_only_env(), **fake_gpus}
    run = [
        "run", f"{OBJECTIVE}:on_its_gpu", "--n-trials", "30", "--run-dir", "run",
        "--listen", address, "--token-file", str(write_token(tmp_path)), "--cpu-slots", "0",
        "--plain", "--sampler", "random",
    ]  # fmt: skip
    _run_beside_a_packing_node(tmp_path, address, run, controller_env, fake_gpus)
    log = run_log(tmp_path)
    assert "rnode/gpu0: 1 -> 2 workers, " in log, log
    assert "rnode/gpu0: 2 -> 3 workers, " in log, log
    trials = load_trials(tmp_path / "run", "node_objective-on_its_gpu")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 30
    slots = {t.user_attrs["slot"] for t in trials}
    assert {"rnode/gpu0#0", "rnode/gpu0#1", "rnode/gpu0#2"} <= slots, slots
    assert not node_processes("rnode")
    # The summary and the report have a row for the node: its slots' trials and busy share.
    summary = (tmp_path / "run" / "summary.md").read_text()
    row = r"\| rnode \| 127\.0\.0\.1:\d+ \| \d+ \| 30 \| \d+% \| cpu \d+% of \d+, "
    assert re.search(row + r"memory [\d.]+/\d+G, gpu0 \d+% [\d.]+/16G \|", summary), summary
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    nodes = re.search(r'<table id="nodes-table">.*?</table>', page, re.S)
    assert nodes is not None and f"<td>rnode</td><td>{len(slots)}</td><td>30</td>" in nodes[0]


def test_a_campaigns_auto_study_grows_a_remote_nodes_gpu(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    fake_gpus = {inventory.FAKE_GPU_DIR_ENV: str(tmp_path / "fake-gpus-rnode")}
    campaign = tmp_path / "campaign.toml"
    campaign.write_text(
        f"""
        [pool]
        cpu_slots = 0

        [[study]]
        name = "small"
        objective = "{OBJECTIVE}:on_its_gpu"
        sampler = "random"
        n_trials = 24
        slot = {{ gpus = "auto" }}
        """
    )
    run = [
        "run", str(campaign), "--run-dir", "run", "--listen", address,
        "--token-file", str(write_token(tmp_path)), "--plain", "--no-report",
    ]  # fmt: skip
    _run_beside_a_packing_node(tmp_path, address, run, {**cpu_only_env(), **fake_gpus}, fake_gpus)
    assert "rnode/gpu0: 1 -> 2 workers, " in run_log(tmp_path), run_log(tmp_path)
    trials = load_trials(tmp_path / "run", "small")
    assert {"rnode/gpu0#0", "rnode/gpu0#1"} <= {t.user_attrs["slot"] for t in trials}


def test_a_node_whose_gpu_readings_hang_stays_in_the_run_and_its_gpus_read_nothing(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    run = [
        "run", f"{OBJECTIVE}:on_its_gpu", "--n-trials", "10", "--run-dir", "run",
        "--listen", address, "--token-file", str(write_token(tmp_path)), "--cpu-slots", "0",
        "--plain", "--no-report",
    ]  # fmt: skip
    controller = BackgroundRun(run, tmp_path, cpu_only_env(), name="controller")
    fake_gpus = tmp_path / "fake-gpus-rnode"
    agent = Agent(
        tmp_path, address, "rnode", 1, nap=1.0, env={inventory.FAKE_GPU_DIR_ENV: str(fake_gpus)}
    )
    try:
        wait_until(lambda: _node_gpu(tmp_path, "rnode", 0) is not None, 30, "a first reading")
        # The fake GPU's lock held: reading it hangs, as NVML can on a GPU in trouble.
        with (fake_gpus / "gpu0" / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:

                def stale() -> bool:
                    gpu = _node_gpu(tmp_path, "rnode", 0)
                    return gpu is not None and gpu["problem"] == STALE_PROBLEM

                wait_until(stale, 20, "rnode's GPU to read nothing")
                gpu = _node_gpu(tmp_path, "rnode", 0)
                assert gpu is not None and gpu["memory_used_mib"] is None
                # Its heartbeats went on meanwhile: it was not lost.
                assert _status_json(tmp_path)["nodes"][0]["state"] == "joined"
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        wait_until(lambda: not stale(), 20, "rnode's GPU to read again")
        assert controller.wait(60) == 0, controller.stderr
        assert agent.wait(15) == 0, agent.log.read_text()
    finally:
        controller.stop()
        agent.stop()
    assert "lost" not in run_log(tmp_path), run_log(tmp_path)


def test_the_live_view_draws_a_nodes_slots_from_its_readings() -> None:
    """Drawn from a hand-built state: a remote GPU slot reads its own node's GPU (not the
    controller's GPU of the same index), a remote CPU slot its CPU use, and each node has a
    row with its CPU, memory and GPUs."""
    state = RunState("search", "/runs/search")
    state.slots = [
        SlotView("gpu0#0", "gpu", (0,), (0,), state="busy"),
        SlotView("rnode/gpu0#0", "gpu", (0,), (1,), state="busy"),
        SlotView("rnode/cpu#0", "cpu", (), (2,), state="busy", cpu_percent=97.0),
    ]
    state.gpus = {0: GpuSample(0, 5.0, 1024, 80 * 1024)}
    node_gpus = {0: GpuSample(0, 40.0, 3000, 16384)}
    state.nodes = {
        "rnode": NodeView("rnode", "10.0.0.7:5000", "joined", 16, node_gpus, 35.0, 3174, 15360),
        "nodeB": NodeView("nodeB", "10.0.0.8:5000", "lost"),
    }
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(render(state, 160))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]

    def row(start: str) -> str:
        return next(line.strip() for line in lines if line.strip().startswith(start))

    assert row("gpu0#0").endswith("gpu0 5% 1.0/80G")
    assert row("rnode/gpu0#0").endswith("gpu0 40% 2.9/16G")
    assert row("rnode/cpu#0").endswith("cpu 97%")
    assert re.search(r"rnode +joined +2 +35% of 16 +3\.1/15G +gpu0 40% 2\.9/16G$", row("rnode "))
    assert re.search(r"nodeB +lost +0 +- +- +-$", row("nodeB "))


def _run_beside_a_packing_node(
    tmp_path: Path,
    address: str,
    run: list[str],
    controller_env: dict[str, str],
    fake_gpus: dict[str, str],
) -> None:
    """The controller's command, and node rnode's agent whose trials each hold 1000 MiB of
    its fake GPU 22 % busy for 0.4 s, until both have ended well."""
    controller = BackgroundRun(run, tmp_path, controller_env, name="controller")
    trial_env = {**fake_gpus, "HYPERFLEET_TEST_MIB": "1000", "HYPERFLEET_TEST_BUSY": "22"}
    agent = Agent(tmp_path, address, "rnode", 1, nap=0.4, env=trial_env)
    try:
        assert controller.wait(120) == 0, controller.stderr
        assert agent.wait(15) == 0, agent.log.read_text()
    finally:
        controller.stop()
        agent.stop()
