"""Resume is running the same command again, however the controller died."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.procs import bench_script, cli_command, cpu_only_env, objective, run_cli, wait_until


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    bench = bench_script("kill_loop")
    report = bench.kill_loop(tmp_path, kills=10, n_trials=60, slots=2, seed=3, max_wait=3)
    assert report.problems == []
    assert report.kills == 10
    assert report.complete == 60
    # Every failure is an interrupted trial, each repeated by one more trial.
    assert report.trials == 60 + report.interrupted
    # Kills came often enough to interrupt a repeat of an interrupted trial, which must run again.
    assert report.longest_chain >= 2


def test_sigkill_loses_nothing_when_next_trials_are_prepared(tmp_path: Path) -> None:
    """With the random sampler each slot's next trial is prepared and sent before its start is
    on disk (hyperfleet.controller.prepared): a kill in between must not lose or repeat it."""
    bench = bench_script("kill_loop")
    report = bench.kill_loop(tmp_path, kills=8, n_trials=50, slots=2, seed=5, sampler="random")
    assert report.problems == []
    assert report.kills == 8
    assert report.complete == 50
    assert report.trials == 50 + report.interrupted


def test_the_checks_catch_a_completed_trial_run_twice(tmp_path: Path) -> None:
    """The kill loop's verdict can fail: a log with one trial started twice is refused."""
    bench = bench_script("kill_loop")
    log = "start 0 0.5\nend 0 0.5\nstart 0 0.5\nend 0 0.5\n"
    assert any("started twice" in p for p in bench.check([], log, 0))


def test_a_second_controller_on_a_run_directory_in_use_stops_at_once(tmp_path: Path) -> None:
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    run_dir = tmp_path / "run"
    args = ["run", objective("waits_for_release"), "--run-dir", str(run_dir), "--n-trials", "1"]
    args += ["--cpu-slots", "1", "--quiet", "--no-report"]
    first = subprocess.Popen(cli_command(*args), cwd=tmp_path, env=env)
    try:
        wait_until(lambda: (tmp_path / "log").exists(), 60, "the first run's trial to start")
        second = run_cli(args, tmp_path, env=env)
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr
        assert "in use by another hyperfleet controller" in second.stderr
    finally:
        (tmp_path / "release").touch()
        assert first.wait(timeout=60) == 0
