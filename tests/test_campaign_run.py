"""Campaign files run for real: ``hyperfleet run campaign.toml`` with worker processes.

The GPUs are fake (``HYPERFLEET_FAKE_GPUS=2``), so what is checked is what each worker's
environment and slot really say, from inside the objective, and when each trial ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from support.procs import campaign_files, cpu_only_env, run_cli

OBJECTIVE = """
import os

import hyperfleet


def make_objective(label):
    def objective(trial):
        slot = hyperfleet.current_slot()
        x = trial.suggest_float("x", -1.0, 1.0)
        trial.set_user_attr("label", label)
        trial.set_user_attr("visible", os.environ.get("CUDA_VISIBLE_DEVICES"))
        trial.set_user_attr("slot", slot.name)
        trial.set_user_attr("kind", slot.kind)
        trial.set_user_attr("gpus", list(slot.gpus))
        trial.set_user_attr("share", slot.gpu_share)
        trial.set_user_attr("cores", len(slot.cores))
        trial.set_user_attr("affinity", len(os.sched_getaffinity(0)))
        trial.set_user_attr("threads", os.environ.get("OMP_NUM_THREADS"))
        return x * x

    return objective


def plain(trial):
    return trial.suggest_int("depth", 1, 9) + trial.suggest_float("eta", 0.0, 1.0)
"""


def write_campaign(folder: Path, text: str) -> Path:
    return campaign_files(folder, text, OBJECTIVE)


def fake_gpu_env(count: int) -> dict[str, str]:
    env = cpu_only_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    env["HYPERFLEET_FAKE_GPUS"] = str(count)
    return env


def load_trials(run_dir: Path, study: str) -> list[FrozenTrial]:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal"))
    )
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def overlaps(a: FrozenTrial, b: FrozenTrial) -> bool:
    assert a.datetime_start and a.datetime_complete and b.datetime_start and b.datetime_complete
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


THREE_SHAPES = """
    [campaign]
    name = "shapes"

    [pool]
    cpu_slots = 2

    [defaults]
    objective = "objective.py:make_objective"
    n_trials = 6
    sampler = "random"

    [[study]]
    name = "half"
    args = { label = "half" }
    slot = { gpus = 0.5 }

    [[study]]
    name = "pair"
    args = { label = "pair" }
    slot = { gpus = 2 }
    n_trials = 3

    [[study]]
    name = "cores"
    args = { label = "cores" }
    slot = "cpu"
"""


def test_three_studies_of_different_shapes_each_run_only_on_their_own_slots(
    tmp_path: Path,
) -> None:
    write_campaign(tmp_path, THREE_SHAPES)
    done = run_cli(
        ["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 180, fake_gpu_env(2)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "shapes"
    half, pair, cores = (load_trials(run_dir, name) for name in ("half", "pair", "cores"))
    assert [len(half), len(pair), len(cores)] == [6, 3, 6]
    for trial in half + pair + cores:
        assert trial.state == TrialState.COMPLETE, trial.system_attrs
    for trial in half:  # one GPU, shared by two slots
        assert trial.user_attrs["kind"] == "gpu"
        assert len(trial.user_attrs["visible"].split(",")) == 1
        assert trial.user_attrs["share"] == 0.5
    for trial in pair:  # both GPUs
        assert trial.user_attrs["kind"] == "gpu"
        assert sorted(trial.user_attrs["visible"].split(",")) == ["GPU-fake-0", "GPU-fake-1"]
    for trial in cores:  # never a GPU slot
        assert trial.user_attrs["kind"] == "cpu"
        assert trial.user_attrs["visible"] == ""
        assert trial.user_attrs["gpus"] == []
    # The pair holds both GPUs: no half-GPU trial ever ran beside it.
    assert not any(overlaps(p, h) for p in pair for h in half)
    # Each study keeps its own trial folders; the log names the study of each trial.
    for name, trials in (("half", half), ("pair", pair), ("cores", cores)):
        for trial in trials:
            assert (run_dir / "studies" / name / "trials" / f"{trial.number:05d}").is_dir()
    log = (run_dir / "run.log").read_text()
    assert "trial 0 of pair started on" in log


def test_a_finished_campaign_run_again_adds_nothing(tmp_path: Path) -> None:
    write_campaign(tmp_path, THREE_SHAPES)
    env = fake_gpu_env(2)
    first = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 180, env)
    assert first.returncode == 0, first.stdout + first.stderr
    again = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 180, env)
    assert again.returncode == 0, again.stdout + again.stderr
    run_dir = tmp_path / "runs" / "shapes"
    assert [len(load_trials(run_dir, n)) for n in ("half", "pair", "cores")] == [6, 3, 6]


def test_sequential_stages_start_only_when_the_previous_stage_has_nothing_left(
    tmp_path: Path,
) -> None:
    write_campaign(
        tmp_path,
        """
        [pool]
        cpu_slots = 2

        [[study]]
        name = "first-{dataset}"
        objective = "objective.py:make_objective"
        args = { label = "{dataset}" }
        slot = "cpu"
        n_trials = 4
        stage = "{dataset}"
        matrix = { dataset = ["a", "b"] }
        """,
    )
    done = run_cli(
        ["run", "campaign.toml", "--sequential", "--plain", "--no-report"], tmp_path, 180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "campaign"
    a, b = load_trials(run_dir, "first-a"), load_trials(run_dir, "first-b")
    assert len(a) == len(b) == 4
    assert {t.user_attrs["label"] for t in a} == {"a"}
    last_a_start = max(t.datetime_start for t in a if t.datetime_start)
    assert all(t.datetime_start and t.datetime_start >= last_a_start for t in b)


def test_named_experiments_run_first_and_a_grid_covers_every_point(tmp_path: Path) -> None:
    write_campaign(
        tmp_path,
        """
        [pool]
        cpu_slots = 2

        [[study]]
        name = "named"
        objective = "objective.py:plain"
        slot = "cpu"
        experiments_only = true
        experiments = [
            { name = "shallow", params = { depth = 2, eta = 0.1 } },
            { name = "deep", params = { depth = 8, eta = 0.3 } },
            { name = "middle", params = { depth = 5, eta = 0.2 } },
        ]

        [[study]]
        name = "grid"
        objective = "objective.py:plain"
        slot = "cpu"
        grid = { depth = [1, 3], eta = [0.0, 0.5] }
        """,
    )
    done = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 180)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "campaign"
    named = load_trials(run_dir, "named")
    ran = {t.user_attrs["experiment"]: t.params for t in named}
    assert ran == {
        "shallow": {"depth": 2, "eta": 0.1},
        "deep": {"depth": 8, "eta": 0.3},
        "middle": {"depth": 5, "eta": 0.2},
    }
    experiments = run_dir / "studies" / "named" / "experiments"
    for name, params in ran.items():
        assert json.loads((experiments / name / "params.json").read_text()) == params
    grid = load_trials(run_dir, "grid")
    points = sorted((t.params["depth"], t.params["eta"]) for t in grid)
    assert points == [(1, 0.0), (1, 0.5), (3, 0.0), (3, 0.5)]


def test_a_gpu_study_falls_back_to_cpu_slots_without_a_gpu_and_says_so(tmp_path: Path) -> None:
    write_campaign(
        tmp_path,
        """
        [pool]
        cpu_slots = 2

        [[study]]
        name = "boosted"
        objective = "objective.py:make_objective"
        args = { label = "boosted" }
        slot = { gpus = 1, fallback_cpus = 1 }
        n_trials = 3
        """,
    )
    done = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no GPU" in done.stdout
    trials = load_trials(tmp_path / "runs" / "campaign", "boosted")
    assert [t.user_attrs["kind"] for t in trials] == ["cpu"] * 3


def test_a_gpu_study_without_fallback_on_a_machine_without_gpu_is_refused(
    tmp_path: Path,
) -> None:
    write_campaign(
        tmp_path,
        """
        [[study]]
        name = "needs-gpu"
        objective = "objective.py:plain"
        slot = { gpus = 1 }
        n_trials = 3
        """,
    )
    done = run_cli(["run", "campaign.toml", "--plain"], tmp_path, 60)
    assert done.returncode == 2
    assert "campaign.toml:2: study 'needs-gpu' needs" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_campaign_none_of_whose_objectives_loads_stops_before_any_storage(
    tmp_path: Path,
) -> None:
    # One broken study among working ones stops alone (tests/test_campaign_loading.py): the
    # first trial starts as soon as one objective has loaded. With none loading, nothing runs.
    write_campaign(
        tmp_path,
        """
        [[study]]
        name = "broken"
        objective = "objective.py:make_objective"
        args = { wrong = 1 }
        slot = "cpu"
        n_trials = 2

        [[study]]
        name = "also-broken"
        objective = "objective.py:make_objective"
        args = { wrong = 2 }
        slot = "cpu"
        n_trials = 2
        """,
    )
    done = run_cli(["run", "campaign.toml", "--plain"], tmp_path, 60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "could not be loaded" in done.stderr and "wrong" in done.stderr
    assert not (tmp_path / "runs" / "campaign").exists()


@pytest.mark.parametrize("flag", [["--n-trials", "3"], ["--cpu-slots", "2"]])
def test_flags_that_a_campaign_file_sets_are_refused(tmp_path: Path, flag: list[str]) -> None:
    write_campaign(tmp_path, THREE_SHAPES)
    done = run_cli(["run", "campaign.toml", *flag], tmp_path, 60)
    assert done.returncode == 2
    assert flag[0] in done.stderr and "campaign.toml" in done.stderr


def test_summary_lists_every_study_and_each_study_gets_its_report(tmp_path: Path) -> None:
    write_campaign(
        tmp_path,
        """
        [defaults]
        objective = "objective.py:plain"
        slot = "cpu"
        n_trials = 2

        [[study]]
        name = "one"

        [[study]]
        name = "two"
        """,
    )
    done = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 120)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "campaign"
    summary = (run_dir / "summary.md").read_text()
    assert "## Study `one`" in summary and "## Study `two`" in summary
    best = json.loads((run_dir / "studies" / "two" / "best" / "best.json").read_text())
    assert best["study"] == "two"
    report = run_cli(["report", str(run_dir)], tmp_path, 120)
    assert report.returncode == 0, report.stderr
    for name in ("one", "two"):
        page = run_dir / "studies" / name / "report" / "index.html"
        assert f"report written to {page}" in report.stdout
        assert name in page.read_text()


def test_resources_shows_each_studys_slots_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hyperfleet.app.cli import main

    write_campaign(tmp_path, THREE_SHAPES)
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["resources", str(tmp_path / "campaign.toml")]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "gpu0:2#0, gpu1:2#0, gpu0:2#1, gpu1:2#1" in lines["half"]
    assert lines["pair"].endswith("slots: gpu0+1")
    assert "slots: cpu" in lines["cores"] and "gpu" not in lines["cores"].split("slots:")[1]
    assert not (tmp_path / "runs").exists()


def test_gpu_memory_on_the_command_line_points_at_the_slot_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hyperfleet.app.cli import main

    write_campaign(tmp_path, THREE_SHAPES)
    assert main(["run", str(tmp_path / "campaign.toml"), "--gpu-memory", "10GiB"]) == 2
    error = capsys.readouterr().err
    assert "--gpu-memory: a campaign file sets this itself" in error
    assert 'slot = { gpus = "auto", gpu_memory = "10GiB" }' in error
    assert not (tmp_path / "runs").exists()


TRAIN_SCRIPT = """
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float)
parser.add_argument("--offset", type=float)
parser.add_argument("--save")
args = parser.parse_args()
if args.save:
    open(args.save, "w").write(str(args.x))
print(json.dumps({"value": args.x * args.x + args.offset}))
"""


def test_a_training_script_per_matrix_value_with_a_refit_that_runs_once(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    (tmp_path / "space.toml").write_text('[params.x]\ntype = "float"\nlow = -2.0\nhigh = 2.0\n')
    write_campaign(
        tmp_path,
        """
        [[study]]
        name = "script-{offset}"
        cmd = "python train.py --x {x} --offset {offset}"
        space = "space.toml"
        slot = "cpu"
        n_trials = 3
        matrix = { offset = [10, 20] }
        refit_cmd = "python train.py --x {x} --offset {offset} --save model.txt"
        """,
    )
    elsewhere = tmp_path / "elsewhere"  # paths are relative to the campaign file, not the cwd
    elsewhere.mkdir()
    command = ["run", "../campaign.toml", "--plain", "--no-report"]
    first = run_cli(command, elsewhere, 180)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = elsewhere / "runs" / "campaign"
    for offset in (10, 20):
        trials = load_trials(run_dir, f"script-{offset}")
        assert len(trials) == 3
        for trial in trials:
            assert trial.value == pytest.approx(trial.params["x"] ** 2 + offset, abs=1e-6)
        refit = run_dir / "studies" / f"script-{offset}" / "best" / "refit"
        best_x = min(trials, key=lambda t: t.value or 0.0).params["x"]
        assert float((refit / "model.txt").read_text()) == pytest.approx(best_x)
    assert first.stdout.count("refit done") == 2
    again = run_cli(command, elsewhere, 180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("refit skipped: best parameters unchanged") == 2
    forced = run_cli([*command, "--force-refit"], elsewhere, 180)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert forced.stdout.count("refit done") == 2


def test_run_campaign_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hyperfleet
    from hyperfleet.resources.inventory import Gpu, Inventory

    write_campaign(tmp_path, THREE_SHAPES)
    monkeypatch.chdir(tmp_path)
    two_gpus = Inventory(
        gpus=tuple(Gpu(i, f"GPU-fake-{i}", "Fake GPU", kind="fake") for i in range(2)),
        cores=(0, 1),
    )
    outcome = hyperfleet.run_campaign(
        "campaign.toml", run_dir="here", display="quiet", report=False, inventory=two_gpus
    )
    assert outcome.status == "completed"
    assert {s.study_name: len(s.trials) for s in outcome.studies} == {
        "half": 6,
        "pair": 3,
        "cores": 6,
    }
    assert outcome.counts["complete"] == 15
    pair = load_trials(tmp_path / "here", "pair")
    both = ["GPU-fake-0", "GPU-fake-1"]
    assert all(sorted(t.user_attrs["visible"].split(",")) == both for t in pair)


def test_a_two_gpu_study_with_priority_keeps_its_gpus_until_done(tmp_path: Path) -> None:
    campaign = THREE_SHAPES.replace("    n_trials = 3\n", "    n_trials = 3\n    priority = 1\n")
    assert campaign != THREE_SHAPES
    write_campaign(tmp_path, campaign)
    done = run_cli(
        ["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 180, fake_gpu_env(2)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "shapes"
    half, pair = load_trials(run_dir, "half"), load_trials(run_dir, "pair")
    assert len(half) == 6 and len(pair) == 3
    first = min(t.datetime_start for t in pair if t.datetime_start)
    last = max(t.datetime_complete for t in pair if t.datetime_complete)
    # Once the pair has its GPUs it keeps them: no half-GPU trial starts until it is done.
    assert not [t for t in half if t.datetime_start and first <= t.datetime_start <= last]
    assert not any(overlaps(p, h) for p in pair for h in half)
