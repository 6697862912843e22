"""A real SLURM cluster on this machine: munged, slurmctld and two slurmd with node names of
their own (n1, n2), from Debian's slurm-wlm and munge, all in a folder of the test's.

Needs root (the daemons run as root here) and the packages; :func:`slurm_cluster` skips the test
with the reason when they are missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from support.procs import wait_until

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd", "salloc", "srun")
MUNGE_KEY = Path("/etc/munge/munge.key")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(folder: Path, addresses: Mapping[str, str]) -> str:
    host = socket.gethostname()
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr={addresses.get(n, '127.0.0.1')} "
        f"Port={_free_port()} CPUs={os.cpu_count() or 1} State=UNKNOWN"
        for n in NODES
    )
    return f"""ClusterName=hftest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


def _run(*args: str, env: dict[str, str]) -> None:
    subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def slurm_cluster(
    folder: Path, addresses: Mapping[str, str] | None = None
) -> Iterator[dict[str, str]]:
    """Yields the environment that points SLURM's commands at the cluster. ``addresses``: the
    address SLURM reaches a node by (``NodeAddr``, default 127.0.0.1), one of this machine's."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if os.geteuid() != 0 or missing or not MUNGE_KEY.exists():
        pytest.skip(f"a SLURM cluster here needs root, slurm-wlm and munge (missing: {missing})")
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", *(f"spool-{n}" for n in NODES)):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    shutil.copyfile(MUNGE_KEY, key)
    key.chmod(0o600)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, addresses or {}))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        _start_daemons(folder, conf, key, env)
        yield env
    finally:
        # Only this cluster's jobs: the commands talk to its own slurmctld.
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for pid_file in [f"slurmd-{n}.pid" for n in NODES] + ["slurmctld.pid", "munged.pid"]:
            _stop_daemon(folder / pid_file)


def _start_daemons(folder: Path, conf: Path, key: Path, env: dict[str, str]) -> None:
    try:
        _run(
            "munged", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
            f"--log-file={folder}/munged.log", f"--pid-file={folder}/munged.pid",
            f"--seed-file={folder}/munged.seed", env=env,
        )  # fmt: skip
        _run("slurmctld", "-c", "-f", str(conf), env=env)
        for node in NODES:
            _run("slurmd", "-N", node, "-f", str(conf), env=env)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot start SLURM here: {exc.cmd[0]}: {exc.stderr.strip()}")
    wait_until(lambda: _idle_nodes(env) == len(NODES), 30, "both slurmd to be idle")


def _idle_nodes(env: dict[str, str]) -> int:
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True, text=True, check=False
    ).stdout.split()
    return int(out[1]) if len(out) == 2 and out[0] == "idle" else 0


def _stop_daemon(pid_file: Path) -> None:
    with suppress(OSError, ValueError):
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), 10, f"{pid_file.stem} to exit")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
