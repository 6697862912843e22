"""The release: one version everywhere (``hyperfleet --version``, ``__version__``, the metadata).

Building and installing the wheel itself is .ci/run's job (it takes a fresh virtual environment
and a minute); these checks are the cheap part of it.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import hyperfleet

ROOT = Path(__file__).resolve().parent.parent


def test_version_flag_prints_the_package_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hyperfleet.app.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"hyperfleet {hyperfleet.__version__}"


def test_installed_metadata_has_the_attribute_version() -> None:
    assert importlib.metadata.version("hyperfleet") == hyperfleet.__version__


def test_pyproject_reads_the_version_from_the_package() -> None:
    # One source: a version written in pyproject.toml as well would drift from __version__.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert 'version = { attr = "hyperfleet.__version__" }' in pyproject
    assert not re.search(r'^version = "', pyproject, re.M)


def test_changelog_has_a_section_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert f"## [{hyperfleet.__version__}]" in changelog
