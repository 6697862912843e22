"""Names that become folders (studies, experiments, grid points) are checked before anything
runs: none maps to '.', '..' or too long a name, and no two map to the same folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hyperfleet.campaign import load_campaign
from hyperfleet.errors import ConfigError
from hyperfleet.store.rundir import RunDir

MODELS = "def objective(trial):\n    return trial.suggest_float('x', 0.0, 1.0)\n"


def _load(folder: Path, text: str) -> None:
    (folder / "models.py").write_text(MODELS)
    path = folder / "campaign.toml"
    path.write_text(text.lstrip("\n"))
    load_campaign(path)


def _experiments(*names: str) -> str:
    listed = ", ".join(f'{{ name = "{n}", params = {{ x = 0.5 }} }}' for n in names)
    return f"""
[[study]]
name = "s"
objective = "models.py:objective"
n_trials = 5
experiments = [{listed}]
"""


LONG = "x" * 300

REFUSED = [
    ("experiment dot-dot", _experiments("a", ".."), "experiment name '..' names a folder"),
    ("experiment dot", _experiments("."), "experiment name '.' names a folder"),
    ("experiment too long", _experiments(LONG), "300 bytes long, too long for a folder name"),
    (
        "experiments differing in a space",
        _experiments("lr 0.1", "lr_0.1"),
        "the experiment 'lr 0.1' and the experiment 'lr_0.1' would share the folder "
        "experiments/lr_0.1",
    ),
    (
        "experiments differing in a slash",
        _experiments("lr_0.1", "lr/0.1"),
        "would share the folder experiments/lr_0.1",
    ),
    (
        "grid values differing in a space",
        """
[[study]]
name = "s"
objective = "models.py:objective"
grid = { opt = ["a b", "a_b"] }
""",
        "the grid point 'opt=a b' and the grid point 'opt=a_b' would share the folder",
    ),
    (
        "an experiment named as a grid point",
        """
[[study]]
name = "s"
objective = "models.py:objective"
n_trials = 5
experiments = [{ name = "depth=3", params = { depth = 4 } }]
grid = { depth = [3] }
""",
        "the experiment 'depth=3' and the grid point 'depth=3' would share the folder",
    ),
    (
        "grid point too long",
        f"""
[[study]]
name = "s"
objective = "models.py:objective"
grid = {{ {LONG[:100]} = [1], {LONG[:101]} = [2] }}
""",
        "grid point name",
    ),
    (
        "studies differing in a space",
        """
[[study]]
name = "a b"
objective = "models.py:objective"
n_trials = 5

[[study]]
name = "a_b"
objective = "models.py:objective"
n_trials = 5
""",
        "the studies 'a b' and 'a_b' would share the folder studies/a_b",
    ),
    (
        "matrix studies differing in a space",
        """
[[study]]
name = "m-{data}"
objective = "models.py:objective"
n_trials = 5
matrix = { data = ["a b", "a_b"] }
""",
        "the studies 'm-a b' and 'm-a_b' would share the folder studies/m-a_b",
    ),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_names_that_make_no_folder_or_the_same_folder_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_distinct_names_load(tmp_path: Path) -> None:
    _load(tmp_path, _experiments("lr 0.1", "lr 0.2", "...", "a.b"))


def test_a_stored_name_that_makes_no_folder_gets_no_link(tmp_path: Path) -> None:
    # A name from the storage (an older version's campaign, an objective's own attribute).
    run_dir = RunDir(tmp_path / "run")
    trial_dir = run_dir.trial_dir(0)
    trial_dir.mkdir(parents=True)
    for name in ("..", ".", "", LONG):
        run_dir.link_experiment(name, trial_dir)
    run_dir.link_experiment("fine", trial_dir)
    assert os.listdir(run_dir.path / "experiments") == ["fine"]
