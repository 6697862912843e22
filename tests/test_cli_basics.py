"""``hyperfleet resources`` with fake GPUs, and ``hyperfleet run --help``."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from hyperfleet.app.cli import build_parser, main


def resources(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *flags: str
) -> str:
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "4")
    assert main(["resources", *flags]) == 0
    return capsys.readouterr().out


def slot_lines(output: str) -> list[tuple[str, str, str, str]]:
    return re.findall(r"^  (\S+)\s+gpus=(\S+)\s+cores=(\S+) threads=(\d+)$", output, re.M)


def test_resources_lists_fake_gpus_cores_and_slots(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = resources(monkeypatch, capsys)

    assert "GPUs: 4 fake GPUs from HYPERFLEET_FAKE_GPUS" in out
    for i in range(4):
        assert f"  {i}: Fake GPU GPU-fake-{i} 16384 MiB" in out
    assert f"CPU cores: {len(os.sched_getaffinity(0))}" in out
    gpu_slots = [(name, gpus) for name, gpus, _, _ in slot_lines(out) if gpus != "-"]
    assert gpu_slots == [("gpu0#0", "0"), ("gpu1#0", "1"), ("gpu2#0", "2"), ("gpu3#0", "3")]


def test_resources_shows_the_pool_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    no_cpu = ("--cpu-slots", "0")
    packed = slot_lines(resources(monkeypatch, capsys, "--trials-per-gpu", "2", *no_cpu))
    assert [gpus for _, gpus, _, _ in packed] == ["0", "0", "1", "1", "2", "2", "3", "3"]

    grouped = slot_lines(resources(monkeypatch, capsys, "--gpus-per-trial", "2", *no_cpu))
    assert [gpus for _, gpus, _, _ in grouped] == ["0,1", "2,3"]


def test_resources_respects_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    out = resources(monkeypatch, capsys, "--cpu-slots", "0")
    assert [gpus for _, gpus, _, _ in slot_lines(out)] == ["2", "3"]
    assert "GPU-fake-0" not in out


def test_resources_reports_an_impossible_request_as_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["resources", "--gpus-per-trial", "8"]) == 2
    assert "--gpus-per-trial 4 or less" in capsys.readouterr().err


def run_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = commands.choices["run"]
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def test_run_help_explains_each_flag_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that argparse wraps nothing
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out

    actions = [a for a in run_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) >= 15
    for action in actions:
        assert action.help, f"{action.option_strings[0]} has no help"
        assert "\n" not in action.help and len(action.help) <= 100, action.option_strings[0]
        assert action.help in out, action.option_strings[0]
    for flag in ("--n-trials", "--timeout", "--trials-per-gpu", "--gpus-per-trial", "--gpus"):
        assert flag in out
