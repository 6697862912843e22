"""optuna-integration's ``MLflowCallback`` under hyperfleet, against a real MLflow tracking
server (``mlflow server``, a SQLite store, on loopback) that this module starts once: one MLflow
run per trial with its parameters and value, as ``study.optimize`` leaves; ``track_in_mlflow``
logging from the objective in the worker into the same run; and ``hyperfleet.TrackerTags``
adding where each trial ran. Real runs on two slots."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

import hyperfleet

pytest.importorskip("mlflow", reason="needs mlflow: pip install -e '.[dev]'")
import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna_integration.mlflow import MLflowCallback

from support.mlflow_server import mlflow_server
from support.tracker_objectives import fails_once, pruned_at_three

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::optuna.exceptions.ExperimentalWarning"
)

# Built when the module is imported, in the test and in each worker: the tracking URI comes
# from MLFLOW_TRACKING_URI, which the server fixture sets before any worker starts.
with warnings.catch_warnings():  # deprecated since optuna-integration 4.9; track_in_mlflow too
    warnings.simplefilter("ignore")
    tracked = MLflowCallback(metric_name="loss")
    in_the_trials_run = tracked.track_in_mlflow()


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with (
        mlflow_server(tmp_path_factory.mktemp("mlflow")) as url,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("MLFLOW_TRACKING_URI", url)
        yield url


@in_the_trials_run
def logs_from_the_worker(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    mlflow.log_metric("x_doubled", 2 * x)
    mlflow.set_tag("worker_slot", hyperfleet.current_slot().name)
    return x * x


def search(
    name: str, tmp_path: Path, objective_fn: object, n_trials: int, **kwargs: object
) -> optuna.Study:
    study = optuna.create_study(study_name=name, sampler=optuna.samplers.RandomSampler(seed=3))
    outcome = hyperfleet.optimize(
        study,
        objective_fn,  # type: ignore[arg-type]
        n_trials=n_trials,
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
        **kwargs,  # type: ignore[arg-type]
    )
    assert outcome.error is None
    return study


def runs_by_trial(uri: str, experiment: str) -> dict[int, Run]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id], max_results=100)
    by_number = {int(run.data.tags["number"]): run for run in runs}
    assert len(by_number) == len(runs), "two MLflow runs for one trial"
    return by_number


def test_mlflow_callback_logs_one_run_per_trial_with_its_params_and_value(
    tracking_uri: str, tmp_path: Path
) -> None:
    callback = MLflowCallback(tracking_uri=tracking_uri, metric_name="loss")
    study = search("plain", tmp_path, pruned_at_three, 6, cpu_slots=2, callbacks=[callback])

    runs = runs_by_trial(tracking_uri, "plain")
    assert sorted(runs) == [t.number for t in study.trials] == list(range(6))
    for trial in study.trials:
        run = runs[trial.number]
        assert run.info.run_name == str(trial.number)
        assert run.data.params == {name: str(value) for name, value in trial.params.items()}
        assert run.data.tags["state"] == trial.state.name
        if trial.state == TrialState.COMPLETE:
            assert run.data.metrics == {"loss": pytest.approx(trial.value)}
        else:
            assert trial.number == 3 and run.data.metrics == {}
    assert {t.system_attrs["hyperfleet:slot"] for t in study.trials} == {"cpu#0", "cpu#1"}


def test_track_in_mlflow_logs_from_the_worker_into_the_trials_run(
    tracking_uri: str, tmp_path: Path
) -> None:
    # MLflow's set_experiment loses a race when two processes create the same experiment at
    # once (the loser logs into "Default"): the experiment exists before the workers start.
    MlflowClient(tracking_uri).create_experiment("in-objective")
    study = search(
        "in-objective", tmp_path, logs_from_the_worker, 4, cpu_slots=2, callbacks=[tracked]
    )

    runs = runs_by_trial(tracking_uri, "in-objective")
    assert sorted(runs) == list(range(4))
    for trial in study.trials:
        run = runs[trial.number]
        assert run.info.run_id == trial.system_attrs["mlflow_run_id"]  # the worker's run
        assert run.info.status == "FINISHED"
        assert run.data.metrics == {
            "loss": pytest.approx(trial.value), "x_doubled": pytest.approx(2 * trial.params["x"])
        }  # fmt: skip
        assert run.data.params == {"x": str(trial.params["x"])}
        assert run.data.tags["worker_slot"] == trial.system_attrs["hyperfleet:slot"]


def test_tracker_tags_tell_mlflow_where_each_trial_ran_and_what_it_repeats(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    callback = hyperfleet.TrackerTags(MLflowCallback(tracking_uri=tracking_uri, metric_name="loss"))
    study = search(
        "tagged", tmp_path, fails_once, 4, cpu_slots=0, retry="error=1", callbacks=[callback]
    )

    runs = runs_by_trial(tracking_uri, "tagged")
    assert sorted(runs) == [t.number for t in study.trials] == list(range(5))
    repeat = next(t for t in study.trials if t.user_attrs.get("hyperfleet.retry_of") == 1)
    assert repeat.state == TrialState.COMPLETE
    for trial in study.trials:
        tags = runs[trial.number].data.tags
        slot = trial.system_attrs["hyperfleet:slot"]
        assert slot in ("gpu0#0", "gpu1#0")
        assert tags["hyperfleet.slot"] == slot
        assert tags["hyperfleet.gpus"] == slot[3]
        assert "hyperfleet.node" not in tags  # one machine: no node
        assert float(tags["hyperfleet.duration_s"]) == pytest.approx(duration(trial), abs=1e-3)
        assert tags.get("hyperfleet.retry_of") == ("1" if trial.number == repeat.number else None)
        assert tags["state"] == trial.state.name
    assert runs[1].data.tags["state"] == "FAIL"
    assert "hyperfleet.slot" not in study.trials[0].user_attrs  # the stored trial is unchanged


def duration(trial: FrozenTrial) -> float:
    assert trial.datetime_start is not None and trial.datetime_complete is not None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()
