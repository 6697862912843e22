"""``--slurm`` inside a real allocation of a real SLURM cluster (slurmctld and two slurmd on
this machine): srun places one agent on each allocated node and the search uses every slot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from support.nodes import OBJECTIVE
from support.procs import cpu_only_env, load_trials
from support.slurm import NODES, slurm_cluster

pytestmark = pytest.mark.cluster


def test_slurm_runs_one_agent_per_allocated_node(tmp_path: Path) -> None:
    with slurm_cluster(tmp_path / "slurm") as slurm_env:
        env = {
            **cpu_only_env(),
            "SLURM_CONF": slurm_env["SLURM_CONF"],
            "HYPERFLEET_FAKE_GPUS": "1",
            "HYPERFLEET_TEST_NAP": "0.2",
        }
        env.pop("CUDA_VISIBLE_DEVICES")
        search = [
            sys.executable, "-m", "hyperfleet.cli", "run", f"{OBJECTIVE}:where_it_runs",
            "--n-trials", "8", "--slurm", "--run-dir", "run", "--cpu-slots", "0",
            "--plain", "--no-report",
        ]  # fmt: skip
        done = subprocess.run(
            ["salloc", f"--nodes={len(NODES)}", *search],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert "srun starts one on each node" in done.stdout
    trials = load_trials(tmp_path / "run", "node_objective-where_it_runs")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert {t.user_attrs["slot"] for t in trials} == {f"{n}/gpu0#0" for n in NODES}
    for trial in trials:  # the agent's node is where SLURM ran it
        assert trial.user_attrs["slot"].startswith(trial.user_attrs["node"] + "/")
        assert trial.user_attrs["cuda_visible_devices"] == "GPU-fake-0"
