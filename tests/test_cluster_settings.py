"""Mistakes in the many-machines flags are refused before anything starts, saying what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperfleet.app.api import cluster_settings
from hyperfleet.app.cli import main
from hyperfleet.cluster.channel import controller_token, parse_address, read_token
from hyperfleet.config import RetryPolicy
from hyperfleet.errors import ConfigError


@pytest.mark.parametrize("text", ["7000", ":7000", "10.0.0.1:99999", "10.0.0.1:port"])
def test_a_listen_address_without_host_or_port_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="write HOST:PORT"):
        parse_address(text)


def test_a_listen_address_is_read_with_or_without_port() -> None:
    assert parse_address("10.0.0.5:7000") == ("10.0.0.5", 7000)
    assert parse_address("node1") == ("node1", 0)
    assert parse_address("[::1]:7000") == ("::1", 7000)


def test_one_engine_at_a_time_and_a_timeout_above_the_heartbeat() -> None:
    with pytest.raises(ConfigError, match="ray or slurm, not both"):
        cluster_settings(None, None, 2.0, 10.0, ray="auto", slurm=True)
    with pytest.raises(ConfigError, match="must be longer than the heartbeat"):
        cluster_settings("127.0.0.1:0", None, "5s", "5s")
    assert cluster_settings(None, None, 2.0, 10.0) is None


def test_slurm_outside_an_allocation_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperfleet.cluster.slurm_launcher import SlurmLauncher

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="inside a SLURM allocation: submit the command"):
        SlurmLauncher(print, lambda node: False)


def test_the_run_directory_keeps_one_private_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYPERFLEET_TOKEN", raising=False)
    token, path = controller_token(None, tmp_path)
    assert path == tmp_path / "agent.token" and path.stat().st_mode & 0o777 == 0o600
    assert controller_token(None, tmp_path) == (token, path)  # the same after a restart
    assert read_token(path) == token and len(token) == 64


def test_an_agent_without_a_token_says_where_to_find_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HYPERFLEET_TOKEN", raising=False)
    assert main(["agent", "--connect", "127.0.0.1:1"]) == 2
    assert "no token: pass --token-file FILE" in capsys.readouterr().err


def test_a_lost_trial_is_retried_three_times_unless_told_otherwise() -> None:
    assert RetryPolicy().allows("lost", 2) and not RetryPolicy().allows("lost", 3)
    assert not RetryPolicy.parse("lost=0").allows("lost", 0)
    assert not RetryPolicy().allows("crash", 0)
