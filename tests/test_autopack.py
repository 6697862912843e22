"""Auto packing in real runs on fake GPUs whose memory and utilisation follow the trials on them
(``hyperfleet.resources.fakegpu``): each worker's trial registers what it holds, the controller
reads the sums as it would read NVML, and a trial that does not fit raises CUDA's
out-of-memory error."""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

import hyperfleet
from hyperfleet.resources import fakegpu, inventory
from hyperfleet.resources.inventory import FAKE_GPUS_ENV, detect_inventory
from hyperfleet.store import schema
from support.autopacking import (
    OBJECTIVES,
    run_packed,
    use_one_fake_gpu,
    workers_over_time,
)


@pytest.fixture
def models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    use_one_fake_gpu(monkeypatch, tmp_path)
    return importlib.import_module("fake_gpu_models")


def run(
    tmp_path: Path, n_trials: int, factory: str = "make_objective", pool: Any = None, **model: Any
) -> tuple[optuna.Study, list[str]]:
    return run_packed(tmp_path, "fake_gpu_models", factory, n_trials, pool, **model)


def test_a_small_model_grows_until_the_gpu_is_busy(models: ModuleType, tmp_path: Path) -> None:
    # Each trial keeps the GPU 22 % busy: four leave it below the 90 % target, five ask for
    # 110 % of it (each then runs a little slower, as on a real GPU).
    study, log = run(tmp_path, 140, mib=1000, busy=22.0, seconds=0.4)
    counts = workers_over_time(log)
    assert counts[:5] == [1, 2, 3, 4, 5], log
    # Between two trials a worker leaves the GPU idle; on a loaded machine those gaps can keep
    # five workers' mean below the target, and a sixth is then rightly tried.
    assert counts[-1] in (5, 6), log
    assert any(f"gpu0 stays at {counts[-1]}: busy" in line for line in log), log
    slots = {t.system_attrs[schema.SLOT_ATTR] for t in study.get_trials()}
    assert slots >= {f"gpu0#{k}" for k in range(5)}
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "## GPU packing" in summary and "gpu0: 1 -> 2 workers, " in summary


def test_a_large_model_grows_only_as_far_as_memory_allows(
    models: ModuleType, tmp_path: Path
) -> None:
    # 6000 MiB each on 16384: two fit with the margin, three would not.
    study, log = run(tmp_path, 40, mib=6000, busy=10.0, seconds=0.3)
    assert workers_over_time(log) == [1, 2], log
    assert any("gpu0 stays at 2: no room for one more trial" in line for line in log), log
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())


def test_a_worker_that_adds_no_throughput_is_retired(models: ModuleType, tmp_path: Path) -> None:
    # Half busy, but two trials side by side each run twice as slow (memory bandwidth).
    study, log = run(tmp_path, 24, mib=2000, busy=50.0, seconds=0.25, saturates=True)
    assert workers_over_time(log) == [1, 2, 1], log
    assert any("2 workers ran" in line and "more no longer helps" in line for line in log), log
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())
    last = max(t.datetime_start for t in study.get_trials() if t.datetime_start is not None)
    retired_at = next(line for line in log if "-> 1 worker," in line)[:19]
    after = [
        t.system_attrs[schema.SLOT_ATTR]
        for t in study.get_trials()
        if t.datetime_start is not None and f"{t.datetime_start:%Y-%m-%d %H:%M:%S}" > retired_at
    ]
    assert last is not None and set(after) <= {"gpu0#0"}, after


def test_a_trial_that_fills_the_gpu_keeps_it_alone(models: ModuleType, tmp_path: Path) -> None:
    study, log = run(tmp_path, 6, mib=15000, busy=10.0, seconds=0.2)
    assert workers_over_time(log) == [1], log
    assert {t.system_attrs[schema.SLOT_ATTR] for t in study.get_trials()} == {"gpu0#0"}


def test_out_of_memory_beside_others_runs_again_with_fewer(
    models: ModuleType, tmp_path: Path
) -> None:
    """Another process takes 11000 MiB once three trials share the GPU: the next trial to
    start beside two others runs out of memory, runs again with the same parameters, and the
    GPU's worker limit drops below the count it ran out at."""
    release = threading.Event()
    taken = threading.Event()

    def other_process_takes_memory() -> None:
        # Once three trials have shared the GPU, 11000 MiB are taken between two of their
        # trials: two trials still fit beside it, three do not.
        deadline = time.monotonic() + 60
        while not release.is_set() and time.monotonic() < deadline:
            reading = fakegpu.read(0)
            if reading is not None and len(reading.by_pid) >= 3:
                break
            time.sleep(0.01)
        while not release.is_set() and time.monotonic() < deadline:
            try:
                with fakegpu.hold(11000, 0.0, index=0):
                    taken.set()
                    release.wait(60)
                return
            except fakegpu.FakeOutOfMemoryError:
                time.sleep(0.005)

    other = threading.Thread(target=other_process_takes_memory)
    other.start()
    try:
        study, log = run(tmp_path, 60, mib=2000, busy=15.0, seconds=0.3)
    finally:
        release.set()
        other.join()
    assert taken.is_set(), log
    trials = study.get_trials()
    oom = [t for t in trials if t.system_attrs.get(schema.KIND_ATTR) == "oom"]
    assert oom, log
    for failed in oom:
        reruns = [t for t in trials if t.user_attrs.get(schema.RETRY_ATTR) == failed.number]
        assert len(reruns) == 1 and reruns[0].params == failed.params
    # Every chain of re-runs ends in a completed trial: no out-of-memory failure is left.
    ends = [t for t in trials if t.number not in schema.retried_numbers(trials)]
    assert all(t.state == TrialState.COMPLETE for t in ends)
    # The count comes down, saying why: the out of memory; or, on a loaded machine, the
    # throughput or an added worker's quick failures that brought it down before the out of
    # memory was seen (the limit then drops with nothing more to say).
    reasons = ("out of memory with", "ran no more trials per second than", "trials in a row")
    assert any(reason in line for line in log for reason in reasons), log
    counts = workers_over_time(log)
    after = counts[counts.index(max(counts)) :]
    assert after[-1] < max(counts)


def test_declared_memory_packs_a_gpu_that_reads_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    monkeypatch.setenv(FAKE_GPUS_ENV, "1")  # no state folder: the fake GPU reads nothing
    monkeypatch.delenv(inventory.FAKE_GPU_DIR_ENV, raising=False)
    # 5 GiB per trial on 16 GiB: two fit with the 10 % margin, three do not.
    study, log = run(tmp_path, 16, "make_sleeper", {"gpu_memory": "5GiB"}, seconds=0.2)
    assert workers_over_time(log) == [1, 2], log
    assert {t.system_attrs[schema.SLOT_ATTR] for t in study.get_trials()} == {"gpu0#0", "gpu0#1"}


# ----- campaigns: slot = { gpus = "auto" } and { gpu_memory = "10GiB" } --------------------


def run_campaign(
    tmp_path: Path, text: str, until: str | None = None
) -> tuple[dict[str, list[FrozenTrial]], list[str]]:
    """Run the campaign file ``text`` on the fake GPUs; each study's trials, and the run log.
    With ``until``, stop it as by Ctrl+C once the run log has a line with it (the budgets only
    cap it): however slowly a loaded machine starts the workers, the decision looked for is
    made."""
    path = tmp_path / "campaign.toml"
    path.write_text(text.replace("MODELS", str(OBJECTIVES / "fake_gpu_models.py")))
    log = tmp_path / "run" / "run.log"
    seen, done = threading.Event(), threading.Event()

    def stop_once_logged() -> None:
        while until is not None and not done.is_set():
            if log.exists() and until in log.read_text():
                seen.set()
                os.kill(os.getpid(), signal.SIGINT)  # running trials finish
                return
            done.wait(0.05)

    watcher = threading.Thread(target=stop_once_logged)
    watcher.start()
    try:
        outcome = hyperfleet.run_campaign(
            path,
            run_dir=tmp_path / "run",
            display="quiet",
            report=False,
            inventory=detect_inventory(),
        )
    finally:
        done.set()
        watcher.join()
    lines = log.read_text().splitlines()
    assert seen.is_set() == (until is not None), lines
    assert outcome.status == ("completed" if until is None else "stopped"), outcome.message
    return {study.study_name: study.get_trials() for study in outcome.studies}, lines


def test_auto_studies_of_a_campaign_share_the_workers_each_gpu_grows(
    models: ModuleType, tmp_path: Path
) -> None:
    # 5000 MiB each on 16384: two fit with the 10 % margin, three would not, whichever of the
    # two studies' trials they run.
    trials, log = run_campaign(
        tmp_path,
        """
        [pool]
        cpu_slots = 0

        [defaults]
        objective = "MODELS:make_objective"
        sampler = "random"
        n_trials = 200
        slot = { gpus = "auto" }

        [[study]]
        name = "a"
        args = { mib = 5000, busy = 10.0, seconds = 0.25 }

        [[study]]
        name = "b"
        args = { mib = 5000, busy = 15.0, seconds = 0.25 }
        """,
        until="gpu0 stays at 2",
    )
    assert workers_over_time(log) == [1, 2], log
    assert any("gpu0 stays at 2: no room for one more trial" in line for line in log), log
    every = [t for study in trials.values() for t in study]
    assert all(t.state == TrialState.COMPLETE for t in every)  # none ran out of memory
    assert {t.system_attrs[schema.SLOT_ATTR] for t in every} == {"gpu0#0", "gpu0#1"}
    # The two studies' trials ran side by side on the GPU.
    assert any(side_by_side(a, b) for a in trials["a"] for b in trials["b"]), log
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "## GPU packing" in summary and "gpu0: 1 -> 2 workers, " in summary


def side_by_side(a: FrozenTrial, b: FrozenTrial) -> bool:
    assert a.datetime_start and a.datetime_complete and b.datetime_start and b.datetime_complete
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


def test_a_campaign_study_packs_by_its_declared_gpu_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(FAKE_GPUS_ENV, "1")  # no state folder: only the declared size packs
    monkeypatch.delenv(inventory.FAKE_GPU_DIR_ENV, raising=False)
    monkeypatch.setenv(inventory.FAKE_GPU_MIB_ENV, str(24 * 1024))
    # 10 GiB per trial on 24 GiB: two fit with the 10 % margin, three do not.
    trials, log = run_campaign(
        tmp_path,
        """
        [pool]
        cpu_slots = 0

        [[study]]
        name = "sleeper"
        objective = "MODELS:make_sleeper"
        args = { seconds = 0.15 }
        n_trials = 200
        slot = { gpu_memory = "10GiB" }
        """,
        until="gpu0 stays at 2",
    )
    assert workers_over_time(log) == [1, 2], log
    assert any("gpu0 stays at 2: no room for one more trial" in line for line in log), log
    slots = {t.system_attrs[schema.SLOT_ATTR] for t in trials["sleeper"]}
    assert slots == {"gpu0#0", "gpu0#1"}


def test_fixed_shares_wait_until_no_auto_packed_trial_holds_the_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A GPU is packed automatically or cut into fixed shares, never both at once. The
    half-GPU study's objective loads slowly, so the auto study has the GPU first and grows to
    two workers; whenever the half study gets the GPU, no half trial runs beside an
    auto-packed one, on either worker."""
    monkeypatch.setenv(FAKE_GPUS_ENV, "1")
    monkeypatch.delenv(inventory.FAKE_GPU_DIR_ENV, raising=False)
    trials, log = run_campaign(
        tmp_path,
        """
        [pool]
        cpu_slots = 0

        [defaults]
        objective = "MODELS:make_sleeper"

        [[study]]
        name = "auto"
        args = { seconds = 0.15 }
        n_trials = 32
        slot = { gpu_memory = "6GiB" }

        [[study]]
        name = "half"
        args = { seconds = 0.15, load_seconds = 3.0 }
        n_trials = 4
        slot = { gpus = 0.5 }
        """,
    )
    assert 2 in workers_over_time(log), log
    assert any(t.system_attrs[schema.SLOT_ATTR] == "gpu0#1" for t in trials["auto"])
    assert len(trials["half"]) == 4
    for half in trials["half"]:
        assert not any(side_by_side(half, auto) for auto in trials["auto"]), half.number
