"""Nodes in network namespaces of their own, joined to a bridge by veth pairs, so that a test
can cut one node's link for real: its packets stop, and neither side sees the connection close.

Needs root and iproute2; :func:`network` skips the test with the reason when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Network:
    controller_ip: str
    namespaces: dict[str, str]  # node -> namespace
    links: dict[str, str]  # node -> the host side of its veth pair

    def prefix(self, node: str) -> list[str]:
        """What runs a command inside the node's namespace."""
        return ["ip", "netns", "exec", self.namespaces[node]]

    def cut(self, node: str) -> None:
        _ip("link", "set", self.links[node], "down")

    def heal(self, node: str) -> None:
        _ip("link", "set", self.links[node], "up")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@contextmanager
def network(nodes: list[str]) -> Iterator[Network]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
    bridge = f"hfbr{tag}"
    made: list[list[str]] = []  # how to undo each step, last first
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(["link", "del", bridge])
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        namespaces, links = {}, {}
        for i, node in enumerate(nodes):
            namespace, host, inside = f"hf{tag}n{i}", f"hf{tag}a{i}", f"hf{tag}b{i}"
            _ip("netns", "add", namespace)
            made.append(["netns", "del", namespace])
            _ip("link", "add", host, "type", "veth", "peer", "name", inside)
            made.append(["link", "del", host])
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", host, "master", bridge)
            _ip("link", "set", host, "up")
            for step in (
                ["addr", "add", f"{subnet}.{10 + i}/24", "dev", inside],
                ["link", "set", inside, "up"],
                ["link", "set", "lo", "up"],
            ):
                _ip("-n", namespace, *step)
            namespaces[node], links[node] = namespace, host
    except subprocess.CalledProcessError as exc:
        _undo(made)
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    try:
        yield Network(f"{subnet}.1", namespaces, links)
    finally:
        _undo(made)


def _undo(made: list[list[str]]) -> None:
    for step in reversed(made):
        subprocess.run(["ip", *step], capture_output=True, timeout=10, check=False)
