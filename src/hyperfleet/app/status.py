"""``hyperfleet status RUN_DIR``: a run's progress, from another terminal or after the end.

The running controller cannot be asked, so this reads what it leaves behind: the storage (the
trials, authoritative; a journal file may be appended while it is read, which Optuna's journal
storage handles) and ``status.json`` (slots, busy time, whether the controller lives).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.display import format as fmt
from hyperfleet.errors import RunDirError
from hyperfleet.report import tables
from hyperfleet.report.best import best_trials
from hyperfleet.report.campaign import StudyRow, StudyTrials, read_trials, study_rows, text_table
from hyperfleet.store.run_reader import RunData, open_run
from hyperfleet.store.rundir import RunDir
from hyperfleet.store.schema import EXPERIMENT_ATTR, REASON_ATTR, SLOT_ATTR


def controller_alive(snapshot: dict[str, Any] | None) -> bool:
    if snapshot is None or snapshot.get("ended"):
        return False
    if snapshot.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes; trust the snapshot
    return psutil.pid_exists(int(snapshot.get("pid", -1)))


# ----- the status dictionary -----------------------------------------------------------------


def status(run_dir: str | Path) -> dict[str, Any]:
    run = open_run(run_dir)
    now = time.time()
    snapshot = run.snapshot
    alive = controller_alive(snapshot)
    read = read_trials(run.studies)
    trials = [(s, t) for s, study_trials in read for t in study_trials]
    return {
        "run_dir": str(run.path),
        "run_name": snapshot.get("run_name") if snapshot else run.path.name,
        "active": alive,
        "stopping": bool(snapshot.get("stopping")) if snapshot else False,
        "elapsed_s": _elapsed(snapshot, now, alive),
        "snapshot_age_s": now - float(snapshot["updated"]) if snapshot else None,
        "studies": [_study_status(s, study_trials) for s, study_trials in read],
        "campaign_table": _campaign_table(read) if _is_campaign(run) else None,
        "running": [_running(s, t, now) for s, t in trials if t.state == TrialState.RUNNING],
        "slots": _slots(snapshot, now, alive) if snapshot else _slots_from_trials(trials),
        "nodes": _nodes(snapshot, alive) if snapshot else [],
    }


def _is_campaign(run: RunData) -> bool:
    if len(run.studies) > 1:
        return True
    try:
        return RunDir(run.path).kind == "campaign"
    except RunDirError:
        return False  # an unreadable record: status still shows what the storage holds


def _campaign_table(studies: list[StudyTrials]) -> list[dict[str, Any]]:
    """The studies side by side, as in the campaign's report and ``summary.md``."""
    return [dataclasses.asdict(row) for row in study_rows(studies)]


def _elapsed(snapshot: dict[str, Any] | None, now: float, alive: bool) -> float | None:
    if snapshot is None:
        return None
    end = now if alive else float(snapshot["updated"])
    return end - float(snapshot["started"])


def _study_status(study: optuna.Study, trials: list[FrozenTrial]) -> dict[str, Any]:
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    best = best_trials(study, trials)
    return {
        "name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "counts": counts,
        "total": len(trials),
        "best": [
            {
                "number": t.number,
                "values": t.values,
                "params": t.params,
                "experiment": t.user_attrs.get(EXPERIMENT_ATTR),
            }
            for t in best
        ],
        "last_failure": _last_failure(trials),
        "experiments": [
            {"name": name, "number": t.number, "state": t.state.name.lower(), "values": t.values}
            for name, t in tables.experiments(trials).items()
        ],
    }


def _last_failure(trials: list[FrozenTrial]) -> dict[str, Any] | None:
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if not failed:
        return None
    last = failed[-1]
    return {"number": last.number, "reason": str(last.system_attrs.get(REASON_ATTR, ""))}


def _running(study: optuna.Study, trial: FrozenTrial, now: float) -> dict[str, Any]:
    start = trial.datetime_start.timestamp() if trial.datetime_start else None
    return {
        "study": study.study_name,
        "number": trial.number,
        "experiment": trial.user_attrs.get(EXPERIMENT_ATTR),
        "slot": trial.system_attrs.get(SLOT_ATTR),
        "elapsed_s": now - start if start is not None else None,
        "params": trial.params,
    }


def _slots(snapshot: dict[str, Any], now: float, alive: bool) -> list[dict[str, Any]]:
    """Each slot's busy time, counting a trial still on it, over the time the run ran trials
    (as summary.md and the report count it; a snapshot of an older version: the controller's
    life so far)."""
    end = now if alive else float(snapshot["updated"])
    elapsed = max(1e-9, end - float(snapshot["started"]))
    running = snapshot.get("running_s")
    if isinstance(running, (int, float)) and running > 0:
        busy_now = alive and any(s.get("state") == "busy" for s in snapshot.get("slots", []))
        elapsed = running + (max(0.0, now - float(snapshot["updated"])) if busy_now else 0.0)
    slots = []
    for slot in snapshot.get("slots", []):
        busy = float(slot.get("busy_seconds", 0.0))
        running = alive and slot.get("state") == "busy" and slot.get("since") is not None
        if running:
            busy += max(0.0, now - float(slot["since"]))
        slots.append(
            {
                "name": slot["name"],
                "state": slot["state"] if alive else "stopped",
                "trial": slot.get("trial") if running else None,
                "cpu_percent": slot.get("cpu_percent") if running else None,
                "trials_done": slot.get("trials_done", 0),
                "busy_s": busy,
                "busy_fraction": min(1.0, busy / elapsed),
            }
        )
    return slots


def _nodes(snapshot: dict[str, Any], alive: bool) -> list[dict[str, Any]]:
    """The machines agents joined from, with their newest readings (none once the run ended:
    they were true then, not now)."""
    nodes = []
    for node in snapshot.get("nodes", []):
        if not isinstance(node, dict) or "name" not in node:
            continue
        nodes.append(
            {
                **node,
                "state": node.get("state", "joined") if alive else "stopped",
                **({} if alive else {"cpu_percent": None, "memory_used_mib": None, "gpus": []}),
            }
        )
    return nodes


def _slots_from_trials(trials: list[tuple[optuna.Study, FrozenTrial]]) -> list[dict[str, Any]]:
    """Without a snapshot (a run from an older version): busy time from the trials' own times."""
    finished = [
        t for _, t in trials if t.datetime_start is not None and t.datetime_complete is not None
    ]
    busy, fractions = tables.busy_seconds(finished), tables.busy_fractions(finished)
    done = Counter(tables.slot_of(t) for t in finished)
    return [
        {
            "name": name,
            "state": "unknown",
            "trial": None,
            "trials_done": done[name],
            "busy_s": seconds,
            "busy_fraction": fractions[name],
        }
        for name, seconds in busy.items()
    ]


# ----- as text -------------------------------------------------------------------------------


def format_status(data: dict[str, Any]) -> str:
    state = "running" if data["active"] else "not running"
    if data["active"] and data["stopping"]:
        state = "stopping"
    lines = [f"run {data['run_name']} in {data['run_dir']}: {state}"]
    if data["elapsed_s"] is not None:
        lines[0] += f", {fmt.duration(data['elapsed_s'])} elapsed"
    if data.get("campaign_table"):
        lines.append("studies side by side:")
        lines += text_table([StudyRow(**row) for row in data["campaign_table"]])
    for study in data["studies"]:
        lines += _format_study(study)
    lines.append(f"running trials: {len(data['running'])}")
    for trial in data["running"]:
        lines.append(
            f"  trial {trial['number']}{_experiment(trial)} on {trial['slot'] or '?'} for "
            f"{fmt.duration(trial['elapsed_s'])}: {fmt.params(trial['params'], 60)}"
        )
    if data["slots"]:
        lines.append("slots (busy share so far):")
    for slot in data["slots"]:
        on = f", trial {slot['trial']}" if slot["trial"] is not None else ""
        lines.append(
            f"  {slot['name']:<10} {slot['state']:<8} {100 * slot['busy_fraction']:3.0f}% busy, "
            f"{_count(slot['trials_done'], 'trial')}{on}"
        )
    if data.get("nodes"):
        lines.append("nodes:")
    for node in data.get("nodes", []):
        lines.append(f"  {_node_line(node, data['slots'])}")
    return "\n".join(lines)


def _node_line(node: dict[str, Any], slots: list[dict[str, Any]]) -> str:
    """``nodeA  joined  2 slots, 62% busy; cpu 35% of 16, memory 3.1/15G; gpu0 22% 1.0/16G``."""
    own = [slot for slot in slots if slot["name"].startswith(f"{node['name']}/")]
    text = f"{node['name']:<10} {node['state']:<8} {_count(len(own), 'slot')}"
    if own:
        text += f", {100 * sum(s['busy_fraction'] for s in own) / len(own):.0f}% busy"
    readings = []
    if node.get("cpu_percent") is not None:
        readings.append(f"cpu {node['cpu_percent']:.0f}% of {node.get('cores', '?')}")
    if node.get("memory_used_mib") is not None and node.get("memory_total_mib"):
        used, total = node["memory_used_mib"] / 1024, node["memory_total_mib"] / 1024
        readings.append(f"memory {used:.1f}/{total:.0f}G")
    parts = [text, ", ".join(readings), "  ".join(_gpu_text(gpu) for gpu in node.get("gpus", []))]
    return "; ".join(part for part in parts if part)


def _gpu_text(gpu: dict[str, Any]) -> str:
    """``gpu0 22% 1.0/16G`` (the live view's words), or why NVML cannot read it."""
    if gpu.get("problem"):
        return f"gpu{gpu['index']} {gpu['problem']}"
    util = gpu.get("utilization_pct")
    used = gpu.get("memory_used_mib")
    total = float(gpu.get("memory_total_mib") or 0) / 1024
    util_text = f"{util:.0f}%" if util is not None else "n/a"
    used_text = f"{used / 1024:.1f}" if used is not None else "?"
    return f"gpu{gpu['index']} {util_text} {used_text}/{total:.0f}G"


def _format_study(study: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{n} {s}" for s, n in study["counts"].items() if n) or "no trials"
    lines = [f"study {study['name']} ({', '.join(study['directions'])}): {counts}"]
    best = study["best"]
    if len(best) == 1:
        lines.append(
            f"  best trial {best[0]['number']}{_experiment(best[0])}: "
            f"{fmt.values(best[0]['values'])} "
            f"{fmt.params(best[0]['params'], 60)}"
        )
    elif best:
        lines.append(f"  Pareto front: {len(best)} trials")
        for trial in best[:5]:
            lines.append(
                f"    trial {trial['number']}: {fmt.values(trial['values'])} "
                f"{fmt.params(trial['params'], 50)}"
            )
    if study.get("experiments"):
        shown = ", ".join(_experiment_text(e) for e in study["experiments"])
        lines.append(f"  experiments: {shown}")
    failure = study["last_failure"]
    if failure:
        lines.append(
            f"  last failure: trial {failure['number']}: {fmt.shorten(failure['reason'], 70)}"
        )
    return lines


def _experiment(trial: dict[str, Any]) -> str:
    return f" (experiment {trial['experiment']})" if trial.get("experiment") else ""


def _experiment_text(experiment: dict[str, Any]) -> str:
    text = f"{experiment['name']} {experiment['state']}"
    if experiment["values"] is not None:
        text += f" {fmt.values(experiment['values'])}"
    return f"{text} (trial {experiment['number']})"


def _count(number: int, noun: str) -> str:
    """``1 trial``, ``2 trials``."""
    return f"{number} {noun}" + ("" if number == 1 else "s")
