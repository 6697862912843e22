"""``--slurm`` inside a real allocation of a real SLURM cluster (slurmctld and two slurmd on
this machine): srun places one agent on each allocated node and the search uses every slot; the
example job script survives a preemption, a time limit's signal and a resubmission."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from optuna.trial import FrozenTrial, TrialState

from support.nodes import OBJECTIVE
from support.procs import cpu_only_env, load_trials, wait_until
from support.slurm import NODES, slurm_cluster

pytestmark = pytest.mark.cluster
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "slurm" / "search.sbatch"
STUDY = "node_objective-where_it_runs"
REVOCATION_SECONDS = 2.0  # see _start_now


def _node_env(slurm_env: dict[str, str], nap: float | None = None) -> dict[str, str]:
    """The environment of a search in the local SLURM: one fake GPU a node, trials of ``nap``."""
    env = {**cpu_only_env(), "SLURM_CONF": slurm_env["SLURM_CONF"], "HYPERFLEET_FAKE_GPUS": "1"}
    if nap is not None:
        env["HYPERFLEET_TEST_NAP"] = str(nap)
    env.pop("CUDA_VISIBLE_DEVICES")
    return env


def _run_allocation(
    tmp_path: Path, command: list[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (an ``salloc``) in the test's folder, its output captured."""
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _salloc_search(n_trials: int, *flags: str, nodelist: str = "") -> list[str]:
    """``salloc`` of both nodes running a ``--slurm`` search of the nodes' test objective."""
    where = [f"--nodelist={nodelist}"] if nodelist else []
    return [
        "salloc", f"--nodes={len(NODES)}", *where,
        sys.executable, "-m", "hyperfleet.app.cli", "run", f"{OBJECTIVE}:where_it_runs",
        "--n-trials", str(n_trials), "--slurm", "--run-dir", "run", "--cpu-slots", "0",
        "--plain", "--no-report", *flags,
    ]  # fmt: skip


def test_slurm_runs_one_agent_per_allocated_node(tmp_path: Path) -> None:
    with slurm_cluster(tmp_path / "slurm") as slurm_env:
        done = _run_allocation(tmp_path, _salloc_search(8), _node_env(slurm_env, nap=0.2))
        assert done.returncode == 0, done.stdout + done.stderr
    assert "srun starts one on each node" in done.stdout
    trials = load_trials(tmp_path / "run", "node_objective-where_it_runs")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert {t.user_attrs["slot"] for t in trials} == {f"{n}/gpu0#0" for n in NODES}
    for trial in trials:  # the agent's node is where SLURM ran it
        assert trial.user_attrs["slot"].startswith(trial.user_attrs["node"] + "/")
        assert trial.user_attrs["cuda_visible_devices"] == "GPU-fake-0"


def test_a_node_whose_agent_died_gets_a_fresh_one_and_works_again(tmp_path: Path) -> None:
    """n2's agent killed mid-run (its node still in the allocation): the launcher starts a
    fresh step there, n2 joins again and its slot takes trials again. Its fresh agent then
    stopped by SIGTERM (how SLURM ends a job) is not started again; the run completes."""
    n_trials = 40
    with slurm_cluster(tmp_path / "slurm") as slurm_env:
        log = tmp_path / "run.log"
        with log.open("w") as out:
            run = subprocess.Popen(
                _salloc_search(n_trials),
                cwd=tmp_path,
                env=_node_env(slurm_env, nap=0.3),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_until(lambda: _done_on(tmp_path / "run", "n2") >= 2, 60, "trials on n2")
                _agent_of("n2").kill()
                killed_at, done_before = datetime.now(), _done_on(tmp_path / "run", "n2")
                wait_until(lambda: log.read_text().count("node n2 joined") == 2, 30, "n2 back")
                wait_until(
                    lambda: _done_on(tmp_path / "run", "n2") > done_before + 1, 30, "n2's trials"
                )
                _agent_of("n2").terminate()
                assert run.wait(timeout=60) == 0, log.read_text()
            finally:
                if run.poll() is None:
                    run.kill()
                    run.wait()
    output = log.read_text()
    assert "node n2: its agent ended (srun exited with status 137)" in output, output
    assert output.count("its agent ended") == 1 and output.count("node n2 joined") == 2, output
    trials = load_trials(tmp_path / "run", STUDY)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials, output
    after = [t for t in complete if t.datetime_start and t.datetime_start > killed_at]
    assert any(t.user_attrs["slot"] == "n2/gpu0#0" for t in after), output


def test_a_node_the_controller_refused_gets_no_fresh_agent(tmp_path: Path) -> None:
    """Both nodes refused (the GPU asked for is not there): their agents exit, and no step is
    started for them again while the run waits out its timeout."""
    with slurm_cluster(tmp_path / "slurm") as slurm_env:
        search = _salloc_search(4, "--gpus", "3", "--timeout", "4s")
        done = _run_allocation(tmp_path, search, _node_env(slurm_env), timeout=60)
    output = done.stdout + done.stderr
    for node in NODES:
        assert f"node {node} not used: GPU '3' does not exist" in output, output
        assert output.count(f"hyperfleet agent {node}: joined") == 1, output
    assert "its agent ended" not in output, output


def _done_on(run_dir: Path, node: str) -> int:
    return sum(t.user_attrs.get("node") == node for t in _trials(run_dir) if t.state.is_finished())


def _agent_of(node: str) -> psutil.Process:
    """The agent SLURM runs as ``node`` (not its workers, which share its environment)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            is_agent = "hyperfleet.app.cli" in cmdline and "agent" in cmdline
            if is_agent and proc.environ().get("SLURMD_NODENAME") == node:
                found.append(proc)
    assert len(found) == 1, found
    return found[0]


def test_the_controller_listens_where_the_other_nodes_reach_it(tmp_path: Path) -> None:
    """Node n2 is reached at this machine's own address (its NodeAddr), as a node elsewhere
    is. Where the host name resolves to a loopback address (Debian names the host 127.0.1.1),
    the controller on n1 listens on the interface towards n2, not on the loopback."""
    here = _non_loopback_address()
    with slurm_cluster(tmp_path / "slurm", {"n2": here}) as slurm_env:
        search = _salloc_search(4, nodelist="n1,n2")
        done = _run_allocation(tmp_path, search, _node_env(slurm_env, nap=0.1))
        assert done.returncode == 0, done.stdout + done.stderr
    own = socket.gethostbyname(socket.gethostname())
    expected = here if ipaddress.ip_address(own).is_loopback else own
    assert f"listening for agents on {expected}:" in done.stdout, done.stdout
    assert "node n2 joined" in done.stdout and "warning" not in done.stderr


def _non_loopback_address() -> str:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    pytest.skip("this machine has no IPv4 address outside the loopback")


def test_the_example_job_script_loses_no_trial_to_preemption_or_time_limits(
    tmp_path: Path,
) -> None:
    """examples/slurm/search.sbatch as shipped, its search set by its variables and its
    resources by sbatch's flags (two nodes of two fake GPUs, no GRES). Preempted in requeue
    mode (``scontrol requeue``: SIGTERM to every process of the job at once), it runs again by
    itself; then the signal its time limit sends (SIGTERM to the batch shell alone) stops it
    gracefully, and submitted again it finishes: every trial of the budget completes once, and
    those the preemption ended are interrupted, never crashes."""
    n_trials = 24  # room for the trials that finish between a look and the signal
    with slurm_cluster(tmp_path / "slurm") as slurm_env:
        env = {
            **cpu_only_env(),
            "SLURM_CONF": slurm_env["SLURM_CONF"],
            "HYPERFLEET_FAKE_GPUS": "2",
            "HYPERFLEET_TEST_NAP": "1",
            "VENV": sys.prefix,
            "TARGET": f"{OBJECTIVE}:where_it_runs",
            "N_TRIALS": str(n_trials),
            "DIRECTION": "minimize",
            "RUN_DIR": "run",
            "STOP_GRACE": "20s",
            "EXTRA_FLAGS": "--cpu-slots 0 --no-report",
        }
        env.pop("CUDA_VISIBLE_DEVICES")

        def slurm(*command: str, check: bool = True) -> str:
            done = subprocess.run(
                command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 0 or not check, done.stderr
            return done.stdout.strip()

        def job_state(job: str) -> str:
            # "" once it left the queue (squeue fails once SLURM forgot it)
            return slurm("squeue", "-h", "-j", job, "-o", "%T", check=False)

        def wait_for(what: str, condition: Callable[[list[FrozenTrial]], bool]) -> None:
            wait_until(lambda: condition(_trials(tmp_path / "run")), 60, what)

        submit = ("sbatch", "--parsable", f"--nodes={len(NODES)}", "--gres=none", str(SCRIPT))
        job = slurm(*submit)
        wait_for("trials to complete and run", lambda t: _count(t, "COMPLETE") >= 4)
        wait_for("4 trials to run", lambda t: _count(t, "RUNNING") == 4)

        slurm("scontrol", "requeue", job)  # what a preemption in requeue mode does
        requeued_at = time.monotonic()
        wait_until(lambda: job_state(job) == "PENDING", 30, "the job to be queued again")
        wait_until(
            lambda: _start_now(slurm, job, requeued_at), 60, "the requeued job to start again"
        )
        wait_for("the requeued job's trials", lambda t: _count(t, "COMPLETE") >= 10)

        slurm("scancel", "--batch", "--signal=TERM", job)  # what --signal=B:TERM@60 sends
        wait_until(lambda: not job_state(job), 60, "the job to end")
        assert _count(_trials(tmp_path / "run"), "COMPLETE") < n_trials
        again = slurm(*submit)
        wait_until(lambda: not job_state(again), 60, "the resubmitted job to end")
        output = (tmp_path / f"hyperfleet-{job}.out").read_text()

    trials = _trials(tmp_path / "run")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, output  # the preemption ended running trials
    assert {t.system_attrs["hyperfleet:fail_kind"] for t in failed} == {"interrupted"}, output
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials
    chains = [t.user_attrs.get("hyperfleet.first_attempt", t.number) for t in complete]
    assert len(set(chains)) == n_trials  # no trial completed twice
    repeated = {t.user_attrs["hyperfleet.retry_of"] for t in trials if t.state.is_finished()
                and "hyperfleet.retry_of" in t.user_attrs}  # fmt: skip
    assert repeated == {t.number for t in failed}  # each interrupted trial ran again
    assert "stopping (SIGTERM)" in output


def _start_now(slurm: Callable[..., str], job: str, requeued_at: float) -> bool:
    """Whether the requeued job runs; if not, lift SLURM's requeue delay (its start time is
    set when the job has finished leaving its nodes, so it is lifted until it starts). Not in
    the requeue's own second or the next: slurmd refuses a launch whose credential is no newer
    than the revocation the requeue made (whole seconds), and SLURM then ends the job."""
    if slurm("squeue", "-h", "-j", job, "-o", "%T") == "RUNNING":
        return True
    if time.monotonic() - requeued_at < REVOCATION_SECONDS:
        return False
    # It may have started meanwhile, which the update refuses.
    slurm("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    return False


def _trials(run_dir: Path) -> list[FrozenTrial]:
    if not (run_dir / "optuna.journal").exists():  # loading would make it
        return []
    try:
        return load_trials(run_dir, STUDY)
    except KeyError:  # no study yet
        return []


def _count(trials: list[FrozenTrial], state: str) -> int:
    return sum(t.state.name == state for t in trials)
