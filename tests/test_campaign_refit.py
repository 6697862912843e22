"""Refits in a matrix campaign know which study they are for: a refit function that takes
``args`` gets the study's matrix values, and ``refit_cmd`` works for objective studies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.procs import campaign_files

OBJECTIVE = """
import json


def make(dataset):
    def objective(trial):
        return (trial.suggest_float("x", -1.0, 1.0) - 0.5) ** 2 + len(dataset)
    return objective


def refit(params, args):
    with open(f"submission-{args['dataset']}.json", "w") as out:
        json.dump({"x": params["x"], "args": args}, out)
    return args["dataset"]
"""

SAVE = """
import sys
open(f"model-{sys.argv[1]}.txt", "w").write(sys.argv[2])
"""

CAMPAIGN = """
[pool]
cpu_slots = 2

[defaults]
slot = "cpu"
n_trials = 2
matrix = { dataset = ["iris", "wine"] }
args = { dataset = "{dataset}" }
objective = "objective.py:make"

[[study]]
name = "fn-{dataset}"
refit = "objective.py:refit"

[[study]]
name = "cmd-{dataset}"
refit_cmd = "python save.py {dataset} {x}"
"""


def test_each_refit_of_a_matrix_campaign_gets_its_studys_args(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hyperfleet

    campaign_files(tmp_path, CAMPAIGN, OBJECTIVE)
    (tmp_path / "save.py").write_text(SAVE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    outcome = hyperfleet.run_campaign("campaign.toml", display="quiet", report=False)
    assert outcome.status == "completed", outcome.message
    studies = tmp_path / "runs" / "campaign" / "studies"
    assert set(outcome.refits) == {"fn-iris", "fn-wine", "cmd-iris", "cmd-wine"}
    for dataset in ("iris", "wine"):
        best_x = json.loads((studies / f"fn-{dataset}" / "best" / "params.json").read_text())["x"]
        folder = outcome.refits[f"fn-{dataset}"].folder
        assert outcome.refits[f"fn-{dataset}"].status == "ran"
        assert folder == studies / f"fn-{dataset}" / "best" / "refit"
        written = json.loads((folder / f"submission-{dataset}.json").read_text())
        assert written == {"x": best_x, "args": {"dataset": dataset}}
        result = json.loads((folder / "result.json").read_text())
        assert result["value"] == dataset and result["args"] == {"dataset": dataset}

        cmd_folder = outcome.refits[f"cmd-{dataset}"].folder
        assert cmd_folder == studies / f"cmd-{dataset}" / "best" / "refit"
        best_x = json.loads((studies / f"cmd-{dataset}" / "best" / "params.json").read_text())["x"]
        assert float((cmd_folder / f"model-{dataset}.txt").read_text()) == pytest.approx(best_x)


def test_a_refit_cmd_placeholder_no_best_parameter_has_fails_the_refit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hyperfleet

    campaign_files(
        tmp_path,
        """
        [[study]]
        name = "one"
        objective = "objective.py:make"
        args = { dataset = "iris" }
        slot = "cpu"
        n_trials = 1
        refit_cmd = "python -c pass {depth}"
        """,
        OBJECTIVE,
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    outcome = hyperfleet.run_campaign("campaign.toml", display="quiet", report=False)
    assert outcome.status == "failed"
    assert "uses {depth}, which is no parameter of the best trial" in outcome.message
    assert outcome.refits["one"].status == "failed"


FAILS_FOR_A = """
def make(dataset):
    return lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2


def refit(params, args):
    if args["dataset"] == "a":
        raise RuntimeError("no model for a")
    open(f"model-{args['dataset']}.txt", "w").write(str(params["x"]))
"""

TWO_REFITS = """
[defaults]
slot = "cpu"
n_trials = 2
objective = "objective.py:make"
refit = "objective.py:refit"
matrix = { dataset = ["a", "b"] }
args = { dataset = "{dataset}" }

[[study]]
name = "s-{dataset}"
"""


def test_one_failing_refit_leaves_the_others_and_a_deleted_output_refits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hyperfleet

    campaign_files(tmp_path, TWO_REFITS, FAILS_FOR_A)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def run() -> tuple[hyperfleet.Outcome, list[str]]:
        outcome = hyperfleet.run_campaign("campaign.toml", display="quiet", report=False)
        log = (tmp_path / "runs" / "campaign" / "run.log").read_text().splitlines()
        said = ("started with trial", "refit skipped", "refit done", "refit failed")
        return outcome, [line for line in log if any(words in line for words in said)]

    first, lines = run()
    assert first.status == "failed"
    assert first.message.startswith("study s-a: refit failed: RuntimeError: no model for a")
    assert first.refits["s-b"].status == "ran"  # not skipped for s-a's failure
    model = tmp_path / "runs" / "campaign" / "studies" / "s-b" / "best" / "refit" / "model-b.txt"
    assert model.is_file()
    assert len(lines) == 4  # each study's start, and its end
    assert all("study s-a: refit" in line or "study s-b: refit" in line for line in lines)

    again, lines = run()
    assert again.refits["s-b"].status == "skipped"
    model.unlink()  # the refit's output is gone: the cache no longer holds
    third, lines = run()
    assert third.refits["s-b"].status == "ran" and model.is_file()
    assert any(
        "study s-b: refit" in line and "output model-b.txt is gone" in line for line in lines
    )
