"""The campaign file: parsing into typed studies, and located messages for each mistake.

In the mistake table, the line an error must point at is marked in the TOML with ``# <-``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperfleet.campaign import is_campaign_file, load_campaign
from hyperfleet.campaign.spec import Experiment
from hyperfleet.errors import ConfigError
from hyperfleet.resources.shapes import Shape

MODELS = """
def make_model(dataset, depth=3):
    return lambda trial: 0.0

def objective(trial):
    return 0.0

def refit_model(params):
    return None
"""

SPACE = """
[params.lr]
type = "float"
low = 0.001
high = 0.1
"""

STUDY = """
[[study]]
objective = "models.py:objective"
n_trials = 5
"""


def write_campaign(folder: Path, text: str) -> Path:
    """The campaign file with the objective module and search space it may refer to."""
    (folder / "models.py").write_text(MODELS)
    (folder / "space.toml").write_text(SPACE)
    path = folder / "campaign.toml"
    path.write_text(text.lstrip("\n"))
    return path


def marked_line(text: str) -> int:
    lines = text.lstrip("\n").splitlines()
    marked = [number for number, line in enumerate(lines, 1) if line.rstrip().endswith("# <-")]
    assert len(marked) == 1, "each case marks exactly one line"
    return marked[0]


# (case id, campaign text with the expected line marked, the key as the message names it,
#  a fragment of the explanation)
MISTAKES = [
    (
        "unknown study key, with a suggestion",
        """
[[study]]
objective = "models.py:objective"
n_trial = 5  # <-
""",
        "key 'n_trial'",
        "did you mean 'n_trials'?",
    ),
    (
        "unknown top-level table",
        """
[campain]  # <-
name = "x"
"""
        + STUDY,
        "key 'campain'",
        "did you mean 'campaign'?",
    ),
    (
        "unknown key in [pool]",
        """
[pool]
gpus = "all"
trials_per_gpus = 2  # <-
"""
        + STUDY,
        "[pool], key 'trials_per_gpus'",
        "did you mean 'trials_per_gpu'?",
    ),
    (
        "trials_per_gpu neither a number nor auto",
        """
[pool]
trials_per_gpu = "lots"  # <-
"""
        + STUDY,
        "[pool], key 'trials_per_gpu'",
        'neither a whole number nor "auto"',
    ),
    (
        "unknown key in [campaign]",
        """
[campaign]
time_out = "1h"  # <-
"""
        + STUDY,
        "[campaign], key 'time_out'",
        "did you mean 'timeout'?",
    ),
    (
        "TOML syntax error",
        """
[[study]]
objective = "models.py:objective"
n_trials =   # <-
""",
        "not valid TOML",
        "line 3",
    ),
    (
        "missing objective",
        """
[[study]]  # <-
n_trials = 5
""",
        "[[study]] #1, key 'objective'",
        "is missing",
    ),
    (
        "both objective and cmd",
        """
[[study]]
objective = "models.py:objective"
cmd = "python train.py --lr {lr}"  # <-
space = "space.toml"
n_trials = 5
""",
        "key 'cmd'",
        "not both",
    ),
    (
        "cmd without space",
        """
[[study]]  # <-
cmd = "python train.py --lr {lr}"
n_trials = 5
""",
        "key 'space'",
        "needs a search space file",
    ),
    (
        "space file missing",
        """
[[study]]
cmd = "python train.py --lr {lr}"
space = "nowhere.toml"  # <-
n_trials = 5
""",
        "key 'space'",
        "does not exist",
    ),
    (
        "space only with cmd",
        """
[[study]]
objective = "models.py:objective"
space = "space.toml"  # <-
n_trials = 5
""",
        "key 'space'",
        "only works with cmd",
    ),
    (
        "args only with objective",
        """
[[study]]
cmd = "python train.py --lr {lr}"
space = "space.toml"
args = { dataset = "iris" }  # <-
n_trials = 5
""",
        "key 'args'",
        "only works with objective",
    ),
    (
        "command placeholder that is no parameter",
        """
[[study]]
cmd = "python train.py --lr {lrr}"  # <-
space = "space.toml"
n_trials = 5
""",
        "key 'cmd'",
        "{lrr}",
    ),
    (
        "objective file missing",
        """
[[study]]
objective = "missing.py:objective"  # <-
n_trials = 5
""",
        "key 'objective'",
        "does not exist",
    ),
    (
        "objective function missing",
        """
[[study]]
objective = "models.py:objectiv"  # <-
n_trials = 5
""",
        "key 'objective'",
        "defines no 'objectiv'",
    ),
    (
        "bad direction",
        """
[[study]]
objective = "models.py:objective"
direction = "maximise"  # <-
n_trials = 5
""",
        "key 'direction'",
        "did you mean 'maximize'?",
    ),
    (
        "unknown sampler",
        """
[[study]]
objective = "models.py:objective"
sampler = "tpee"  # <-
n_trials = 5
""",
        "key 'sampler'",
        "did you mean 'tpe'?",
    ),
    (
        "unknown pruner",
        """
[[study]]
objective = "models.py:objective"
pruner = "medain"  # <-
n_trials = 5
""",
        "key 'pruner'",
        "did you mean 'median'?",
    ),
    (
        "n_trials 0, in the second study",
        STUDY
        + """
[[study]]
name = "second"
objective = "models.py:objective"
n_trials = 0  # <-
""",
        "[[study]] #2 'second', key 'n_trials'",
        "at least 1",
    ),
    (
        "bad duration",
        """
[[study]]
objective = "models.py:objective"
timeout = "ten minutes"  # <-
""",
        "key 'timeout'",
        "cannot read timeout",
    ),
    (
        "slot sharing a GPU unevenly",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
slot = { gpus = 0.3 }  # <-
""",
        "key 'slot'",
        "gpus = 0.3",
    ),
    (
        "slot with a GPU and a half",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
[study.slot]  # <-
gpus = 1.5
""",
        "key 'slot'",
        "gpus = 1.5",
    ),
    (
        "slot with no cores",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
slot = { cpus = 0 }  # <-
""",
        "key 'slot'",
        "cpus = 0",
    ),
    (
        "slot table with an unknown key",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
slot = { gpu = 1 }  # <-
""",
        "key 'slot'",
        "did you mean 'gpus'?",
    ),
    (
        "fallback cores on a CPU slot",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
slot = { cpus = 2, fallback_cpus = 2 }  # <-
""",
        "key 'slot'",
        "fallback_cpus = 2",
    ),
    (
        "slot with a GPU count that is a word",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
slot = { gpus = "lots" }  # <-
""",
        "key 'slot'",
        "gpus = 'lots' is not a number nor \"auto\"",
    ),
    (
        "slot with a negative GPU memory",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
slot = { gpus = "auto", gpu_memory = "-3GB" }  # <-
""",
        "key 'slot'",
        "cannot read gpu_memory '-3GB'; write what one trial takes on its GPU",
    ),
    (
        "GPU memory on a CPU-only study",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
[study.slot]  # <-
cpus = 4
gpu_memory = "10GiB"
""",
        "key 'slot'",
        "gpu_memory is set on a CPU trial (the slot asks for no GPU); it says what one trial "
        'takes on its GPU. Add gpus = "auto"',
    ),
    (
        "GPU memory with a fixed share",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
slot = { gpus = 0.5, gpu_memory = "10GiB" }  # <-
""",
        "key 'slot'",
        "gpu_memory is set but gpus = 0.5 fixes what each trial gets",
    ),
    (
        "slot name that does not exist",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
slot = "gpus"  # <-
""",
        "key 'slot'",
        "is not a slot",
    ),
    (
        "empty matrix list",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
matrix = { dataset = [] }  # <-
""",
        "key 'matrix'",
        "non-empty list",
    ),
    (
        "unknown variable in the name",
        """
[[study]]
name = "xgb-{datset}"  # <-
objective = "models.py:objective"
n_trials = 5
matrix = { dataset = ["iris", "wine"] }
""",
        "key 'name'",
        "{datset} is not a matrix variable",
    ),
    (
        "duplicate study names after expansion",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
matrix = { dataset = ["iris", "wine"] }

[[study]]
name = "models-wine"  # <-
objective = "models.py:objective"
n_trials = 5
""",
        "[[study]] #2 'models-wine', key 'name'",
        "already used by [[study]] #1 (objective 'models.py:objective') (line 1)",
    ),
    (
        "experiment without a name",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
experiments = [{ params = { lr = 0.01 } }]  # <-
""",
        "key 'experiments'",
        "experiment #1 needs a name",
    ),
    (
        "duplicate experiment names",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
[[study.experiments]]  # <-
name = "base"
params = { lr = 0.01 }
[[study.experiments]]
name = "base"
params = { lr = 0.02 }
""",
        "key 'experiments'",
        "'base' is used twice",
    ),
    (
        "experiments_only without experiments",
        """
[[study]]
objective = "models.py:objective"
experiments_only = true  # <-
""",
        "key 'experiments_only'",
        "no experiments",
    ),
    (
        "grid together with experiments_only",
        """
[[study]]
objective = "models.py:objective"
experiments = [{ name = "base", params = { lr = 0.01 } }]
experiments_only = true
grid = { lr = [0.01, 0.1] }  # <-
""",
        "key 'grid'",
        "cannot be used together",
    ),
    (
        "weight 0",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
weight = 0  # <-
""",
        "key 'weight'",
        "positive number",
    ),
    (
        "no budget",
        """
[[study]]  # <-
name = "endless"
objective = "models.py:objective"
""",
        "[[study]] #1 'endless', key 'n_trials'",
        "no budget",
    ),
    (
        "no studies",
        """
[campaign]  # <-
name = "empty"
""",
        "the file",
        "declares no study",
    ),
    (
        "a single [study] table",
        """
[study]  # <-
objective = "models.py:objective"
n_trials = 5
""",
        "key 'study'",
        "[[study]] table",
    ),
    (
        "refit together with refit_cmd",
        """
[[study]]
cmd = "python train.py --lr {lr}"
space = "space.toml"
n_trials = 5
refit = "models.py:refit_model"
refit_cmd = "python train.py --lr {lr} --save model.pt"  # <-
""",
        "key 'refit_cmd'",
        "cannot be used together",
    ),
    (
        "bad value inherited from [defaults]",
        """
[defaults]
sampler = "bayes"  # <-

[[study]]
name = "a"
objective = "models.py:objective"
n_trials = 5
""",
        "[defaults] (applied to [[study]] #1 'a'), key 'sampler'",
        "is not one of",
    ),
    (
        "bad retry rule",
        """
[campaign]
retry = "crashes=2"  # <-
"""
        + STUDY,
        "[campaign], key 'retry'",
        "cannot read retry rule",
    ),
    (
        "seed out of numpy's range",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
seed = -1  # <-
""",
        "key 'seed'",
        "seed -1 is out of range",
    ),
    (
        "CMA-ES on two objectives",
        """
[[study]]
objective = "models.py:objective"
n_trials = 5
directions = ["minimize", "maximize"]
sampler = "cmaes"  # <-
""",
        "key 'sampler'",
        "optimises one objective",
    ),
    (
        "pool GPUs as a plain string",
        """
[pool]
gpus = "0,1"  # <-
"""
        + STUDY,
        "[pool], key 'gpus'",
        "not a list of GPUs",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "explanation"),
    [case[1:] for case in MISTAKES],
    ids=[case[0] for case in MISTAKES],
)
def test_each_mistake_names_its_line_and_key(
    tmp_path: Path, text: str, key: str, explanation: str
) -> None:
    path = write_campaign(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_campaign(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{marked_line(text)}: "), message
    assert key in message
    assert explanation in message


def test_the_mistake_table_is_long_enough() -> None:
    assert len(MISTAKES) >= 20
    assert len({case[0] for case in MISTAKES}) == len(MISTAKES)


def test_missing_file_and_folder_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_campaign(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is not a file"):
        load_campaign(tmp_path)


def test_matrix_expands_in_file_order_and_fills_in_values(tmp_path: Path) -> None:
    path = write_campaign(
        tmp_path,
        """
[[study]]
name = "xgb-{dataset}-{depth}"
objective = "models.py:make_model"
args = { dataset = "{dataset}", depth = "{depth}", tag = "d{depth}", fixed = 1 }
stage = "{dataset}"
n_trials = 5
matrix = { dataset = ["iris", "wine"], depth = [3, 6] }

[[study]]
cmd = "python train.py --data {dataset} --lr {lr:.2e} --note {{braces}}"
space = "space.toml"
refit_cmd = "python train.py --data {dataset} --lr {lr} --save model.pt"
n_trials = 5
matrix = { dataset = ["iris"] }
""",
    )
    studies = load_campaign(path).studies
    assert [s.name for s in studies] == [
        "xgb-iris-3",
        "xgb-iris-6",
        "xgb-wine-3",
        "xgb-wine-6",
        "train-iris",  # no placeholder in the (default) name: the values are appended
    ]
    assert [s.index for s in studies] == [0, 1, 2, 3, 4]
    wine_6 = studies[3]
    assert wine_6.args == {"dataset": "wine", "depth": 6, "tag": "d6", "fixed": 1}
    assert wine_6.matrix_values == {"dataset": "wine", "depth": 6}
    assert wine_6.stage == "wine"
    assert wine_6.line == 1
    command = studies[4]
    assert command.cmd == "python train.py --data iris --lr {lr:.2e} --note {{braces}}"
    assert command.refit_cmd == "python train.py --data iris --lr {lr} --save model.pt"
    assert command.line == 9
    assert command.stage == ""


def test_default_name_is_the_objective_stem_with_matrix_values(tmp_path: Path) -> None:
    path = write_campaign(
        tmp_path,
        """
[[study]]
objective = "models.py:make_model"
args = { dataset = "{dataset}" }
n_trials = 2
matrix = { model = ["xgb"], dataset = ["iris", "wine"] }

[[study]]
objective = "models.py:objective"
n_trials = 2
""",
    )
    names = [s.name for s in load_campaign(path).studies]
    assert names == ["models-xgb-iris", "models-xgb-wine", "models"]


def test_defaults_apply_where_a_study_is_silent(tmp_path: Path) -> None:
    path = write_campaign(
        tmp_path,
        """
[defaults]
objective = "models.py:objective"
direction = "maximize"
n_trials = 30
sampler = "random"
seed = 7
matrix = { fold = [0, 1] }

[[study]]
name = "a-{fold}"

[[study]]
name = "b"
cmd = "python train.py --lr {lr}"
space = "space.toml"
directions = ["minimize", "maximize"]
n_trials = 4
matrix = { fold = [9] }
""",
    )
    a0, a1, b = load_campaign(path).studies
    assert (a0.name, a1.name) == ("a-0", "a-1")
    assert a0.target == f"{tmp_path / 'models.py'}:objective"
    assert (a0.directions, a0.n_trials, a0.sampler, a0.seed) == (("maximize",), 30, "random", 7)
    # The study's own cmd and directions replace the inherited objective and direction.
    assert (b.name, b.target, b.cmd) == ("b-9", None, "python train.py --lr {lr}")
    assert (b.directions, b.n_trials, b.sampler) == (("minimize", "maximize"), 4, "random")


def test_study_defaults_without_defaults_table(tmp_path: Path) -> None:
    study = load_campaign(write_campaign(tmp_path, STUDY)).studies[0]
    assert study.directions == ("minimize",)
    assert (study.sampler, study.pruner, study.seed) == ("auto", "median", None)
    assert (study.weight, study.priority, study.stage, study.timeout) == (1.0, 0, "", None)
    assert (study.args, study.cmd, study.space, study.refit, study.refit_cmd) == (None,) * 5
    assert (study.experiments, study.experiments_only, study.grid) == ((), False, None)
    assert study.matrix_values == {}


def test_paths_are_relative_to_the_campaign_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "models.py").write_text(MODELS)
    (project / "spaces").mkdir()
    (project / "spaces" / "lr.toml").write_text(SPACE)
    (project / "campaign.toml").write_text(
        """
[[study]]
name = "fn"
objective = "src/models.py:objective"
refit = "src/models.py:refit_model"
n_trials = 2

[[study]]
name = "cmd"
cmd = "python train.py --lr {lr}"
space = "spaces/lr.toml"
n_trials = 2
"""
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    campaign = load_campaign(Path("..") / "project" / "campaign.toml")
    function, command = campaign.studies
    assert campaign.path == project / "campaign.toml"
    assert function.target == f"{project / 'src' / 'models.py'}:objective"
    assert function.refit == f"{project / 'src' / 'models.py'}:refit_model"
    assert command.space == project / "spaces" / "lr.toml"
    assert campaign.settings.name == "campaign"


@pytest.mark.parametrize(
    ("slot", "shape"),
    [
        (None, Shape(gpus=0.5, fallback_cpus=3)),
        ('"gpu"', Shape(gpus=0.5, fallback_cpus=3)),
        ('"cpu"', Shape(cpus=3)),
        ("{ gpus = 0.25, fallback_cpus = 2 }", Shape(gpus=0.25, fallback_cpus=2)),
        ("{ gpus = 2, cpus = 8 }", Shape(gpus=2.0, cpus=8)),
        ("{ cpus = 4 }", Shape(gpus=0.0, cpus=4)),
        ('{ gpus = "auto" }', Shape(gpus=1.0, auto=True)),
        ('{ gpus = "auto", cpus = 2 }', Shape(gpus=1.0, cpus=2, auto=True)),
        ('{ gpu_memory = "10GiB" }', Shape(gpus=1.0, auto=True, gpu_memory_mib=10240)),
        (
            '{ gpus = "auto", gpu_memory = "512MiB", fallback_cpus = 2 }',
            Shape(gpus=1.0, fallback_cpus=2, auto=True, gpu_memory_mib=512),
        ),
    ],
)
def test_slot_forms_become_shapes(tmp_path: Path, slot: str | None, shape: Shape) -> None:
    slot_line = f"slot = {slot}\n" if slot is not None else ""
    path = write_campaign(
        tmp_path,
        "[pool]\ntrials_per_gpu = 2\nthreads_per_slot = 3\n" + STUDY + slot_line,
    )
    assert load_campaign(path).studies[0].shape == shape


def test_cpu_slot_without_threads_per_slot_leaves_cores_to_the_planner(tmp_path: Path) -> None:
    path = write_campaign(tmp_path, STUDY + 'slot = "cpu"\n')
    assert load_campaign(path).studies[0].shape == Shape(cpus=None)


def test_budgets_from_experiments_grid_and_timeouts(tmp_path: Path) -> None:
    path = write_campaign(
        tmp_path,
        """
[[study]]
name = "only-experiments"
objective = "models.py:objective"
experiments_only = true
experiments = [
    { name = "small", params = { lr = 0.01 } },
    { name = "large", params = { lr = 0.1 } },
]

[[study]]
name = "grid"
objective = "models.py:objective"
grid = { lr = [0.01, 0.1, 1.0], depth = [3, 6] }

[[study]]
name = "grid-capped"
objective = "models.py:objective"
grid = { lr = [0.01, 0.1, 1.0], depth = [3, 6] }
n_trials = 4

[[study]]
name = "timed"
objective = "models.py:objective"
timeout = "1h30m"
experiments = [{ name = "first", params = { lr = 0.05 } }]
""",
    )
    only, grid, capped, timed = load_campaign(path).studies
    assert only.n_trials == 2
    assert only.experiments == (
        Experiment("small", {"lr": 0.01}),
        Experiment("large", {"lr": 0.1}),
    )
    assert grid.n_trials == 6
    assert grid.grid == {"lr": [0.01, 0.1, 1.0], "depth": [3, 6]}
    assert capped.n_trials == 4
    assert (timed.n_trials, timed.timeout, timed.experiments_only) == (None, 5400.0, False)


def test_campaign_timeout_is_a_budget_for_every_study(tmp_path: Path) -> None:
    path = write_campaign(
        tmp_path,
        """
[campaign]
timeout = "2h"

[[study]]
objective = "models.py:objective"
""",
    )
    assert load_campaign(path).studies[0].n_trials is None


def test_campaign_and_pool_settings(tmp_path: Path) -> None:
    path = write_campaign(
        tmp_path,
        """
[campaign]
name = "tabular"
run_dir = "runs/tab"
storage = "sqlite:///x.db"
sequential = true
timeout = "2h"
trial_timeout = 600
retry = "oom=1,crash=1"
max_trials_per_worker = 100

[pool]
gpus = [0, "GPU-1234"]
trials_per_gpu = 2
cpu_slots = 4
threads_per_slot = 2

[[study]]
objective = "models.py:objective"
weight = 2
priority = -1
stage = "first"
"""
        + "\n",
    )
    campaign = load_campaign(path)
    settings = campaign.settings
    assert (settings.name, settings.run_dir, settings.storage) == (
        "tabular",
        Path("runs/tab"),
        "sqlite:///x.db",
    )
    assert (settings.sequential, settings.timeout, settings.trial_timeout) == (True, 7200.0, 600.0)
    assert (settings.retry, settings.max_trials_per_worker) == ("oom=1,crash=1", 100)
    assert campaign.pool.gpus == ["0", "GPU-1234"]
    assert (campaign.pool.trials_per_gpu, campaign.pool.cpu_slots) == (2, 4)
    assert campaign.pool.threads_per_slot == 2
    study = campaign.studies[0]
    assert (study.weight, study.priority, study.stage) == (2.0, -1, "first")


def test_settings_defaults_and_pool_gpu_forms(tmp_path: Path) -> None:
    campaign = load_campaign(write_campaign(tmp_path, '[pool]\ngpus = "all"\n' + STUDY))
    settings = campaign.settings
    assert (settings.name, settings.run_dir, settings.storage, settings.sequential) == (
        "campaign",
        None,
        None,
        False,
    )
    assert (settings.timeout, settings.trial_timeout, settings.retry) == (None, None, "")
    assert campaign.pool.gpus is None
    assert campaign.pool.trials_per_gpu is None  # auto packing, as for a single search
    assert campaign.studies[0].shape == Shape(gpus=1.0, fallback_cpus=1, auto=True)
    said = load_campaign(write_campaign(tmp_path, '[pool]\ntrials_per_gpu = "auto"\n' + STUDY))
    assert said.pool.trials_per_gpu is None
    no_gpus = load_campaign(write_campaign(tmp_path, "[pool]\ngpus = []\n" + STUDY))
    assert no_gpus.pool.gpus == []


def test_expanded_studies_do_not_share_tables(tmp_path: Path) -> None:
    path = write_campaign(
        tmp_path,
        STUDY + "matrix = { fold = [1, 2] }\ngrid = { lr = [0.1] }\n",
    )
    first, second = load_campaign(path).studies
    assert first.grid == second.grid
    assert first.grid is not second.grid


def test_is_campaign_file(tmp_path: Path) -> None:
    path = write_campaign(tmp_path, STUDY)
    assert is_campaign_file(str(path))
    assert not is_campaign_file(str(tmp_path / "models.py"))
    assert not is_campaign_file(str(tmp_path / "absent.toml"))
    assert not is_campaign_file(f"{tmp_path / 'models.py'}:objective")
