"""The live view as a pure function of the run state: ``render(state, width)``.

Every table cell is a single line (``no_wrap`` with an ellipsis), and the free-text columns
(parameters, reasons) get whatever width is left, so the view fits 80 columns and uses more
when the terminal has it.
"""

from __future__ import annotations

import time

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hyperfleet.display import format as fmt
from hyperfleet.display.runstate import NodeView, RunState, SlotView, StudyView, TrialRecord
from hyperfleet.resources.monitor import GpuSample

RECENT_ROWS = 6
STATE_STYLES = {
    "COMPLETE": "green",
    "PRUNED": "yellow",
    "FAIL": "red",
    "RUNNING": "cyan",
    "busy": "green",
    "idle": "dim",
    "starting": "yellow",
    "stopped": "red",
    "joined": "green",
    "lost": "red",
}


def render(state: RunState, width: int, now: float | None = None) -> RenderableType:
    now = time.time() if now is None else now
    return Group(
        header(state, now, width),
        slots_table(state, width, now),
        *([nodes_table(state, width)] if state.nodes else []),
        studies_table(state, width, now),
        recent_table(state, width),
        footer(state),
    )


# ----- header ------------------------------------------------------------------------------


def header(state: RunState, now: float, width: int) -> Text:
    elapsed = now - state.started
    text = Text()
    text.append("hyperfleet ", style="bold")
    text.append(state.run_name, style="bold cyan")
    stage = stage_text(state, now)
    if stage:
        text.append(f"  {stage}", style="bold")
    text.append(f"  elapsed {fmt.duration(elapsed)}")
    progress = progress_text(state, elapsed, now)
    # On a narrow terminal the progress goes on its own line rather than wrapping mid-phrase.
    text.append("\n" if len(text) + 2 + len(progress) > width else "  ")
    text.append(progress)
    return text


def stage_text(state: RunState, now: float) -> str:
    """Where a sequential campaign is: ``stage iris (2 of 3)``; "" when it has one stage."""
    stages = sorted({s.stage for s in state.studies})
    if not state.sequential or len(stages) < 2:
        return ""
    waiting = [s.stage for s in state.studies if not study_done(s, now)]
    current = min(waiting) if waiting else stages[-1]
    names = [s.stage_name or s.name for s in state.studies if s.stage == current]
    return f"stage {names[0]} ({stages.index(current) + 1} of {len(stages)})"


def study_done(study: StudyView, now: float) -> bool:
    """Nothing left to run: its trials all finished, or its time is up and none still runs."""
    if study.running:
        return False
    if study.n_trials is not None and study.finished >= study.n_trials:
        return True
    return study.ends_at is not None and now >= study.ends_at


def budget_left(study: StudyView, now: float) -> str:
    """What the study may still run: ``12`` trials, ``41m`` of its time, or both; "-" for
    neither (it runs until the campaign's timeout)."""
    parts = []
    if study.n_trials is not None:
        parts.append(str(max(0, study.n_trials - study.finished)))
    left = _time_budget_left(study, now)
    if left is not None:
        parts.append(fmt.duration(left))
    return ", ".join(parts) or "-"


def progress_text(state: RunState, elapsed: float, now: float | None = None) -> str:
    """Budget, progress and an estimate of the time left."""
    parts = []
    budget = sum(s.n_trials or 0 for s in state.studies)
    finished = sum(s.finished for s in state.studies)
    if budget:
        parts.append(f"{finished}/{budget} trials ({100 * finished / budget:.0f}%)")
    else:
        parts.append(f"{finished} trials")
    if state.timeout is not None:
        parts.append(f"timeout {fmt.duration(state.timeout)}")
    left = time_left(state, elapsed, now)
    if left is not None:
        parts.append(f"~{fmt.duration(left)} left")
    return "  ".join(parts)


def time_left(state: RunState, elapsed: float, now: float | None = None) -> float | None:
    """The sooner of the run's timeout and the time its studies still need: the trials left at
    this run's pace so far, or what is left of a study's time budget when that runs out first
    (a study with a time budget only needs all of it)."""
    now = state.started + elapsed if now is None else now
    done_here = sum(s.trials_done for s in state.slots)  # trials this run, not resumed ones
    pace = elapsed / done_here if done_here and elapsed > 0 else None  # seconds per trial
    needed: list[float | None] = []
    trials_left, pooled = 0, False
    for study in state.studies:
        if study_done(study, now):
            continue
        clock = _time_budget_left(study, now)
        left = None if study.n_trials is None else max(0, study.n_trials - study.finished)
        if left is None or (clock is not None and (pace is None or left * pace >= clock)):
            needed.append(clock)  # its own clock ends it first (None: nothing ends it)
        else:
            trials_left, pooled = trials_left + left, True
    if pooled:
        needed.append(trials_left * pace if pace is not None else None if trials_left else 0.0)
    estimates = []
    if state.timeout is not None:
        estimates.append(max(0.0, state.timeout - elapsed))
    if needed and None not in needed:
        estimates.append(max(n for n in needed if n is not None))
    return min(estimates) if estimates else None


def _time_budget_left(study: StudyView, now: float) -> float | None:
    if study.ends_at is not None:
        return max(0.0, study.ends_at - now)
    return study.timeout  # not started yet: all of it (None: no limit of its own)


# ----- slots -------------------------------------------------------------------------------


def slots_table(state: RunState, width: int, now: float) -> Table:
    table = _table("Slots", width)
    table.add_column("slot", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("study", no_wrap=True, overflow="ellipsis", ratio=1)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("use", no_wrap=True, overflow="ellipsis", ratio=2)
    for slot in state.slots:
        since = now - slot.since if slot.since is not None and slot.state == "busy" else None
        table.add_row(
            slot.name,
            Text(slot.state, style=STATE_STYLES.get(slot.state, "")),
            str(slot.trial) if slot.trial is not None else "-",
            _study_cell(slot),
            fmt.duration(since) if since is not None else "-",
            slot_use(state, slot),
        )
    return table


def _study_cell(slot: SlotView) -> str:
    """The study of the slot's trial, and the named experiment it runs."""
    if slot.study is None:
        return "-"
    return f"{slot.study}: {slot.experiment}" if slot.experiment else slot.study


def slot_use(state: RunState, slot: SlotView) -> str:
    """GPU utilisation and memory (one NVML sample per GPU, shared by its slots; a node's as
    its agent read them), or the CPU use of the trial's processes."""
    if slot.gpus:
        node = state.nodes.get(slot.name.rpartition("/")[0])
        samples = node.gpus if node is not None else state.gpus
        return "  ".join(gpu_use(samples.get(index), index) for index in slot.gpus)
    if slot.cpu_percent is None:
        return "-"
    return f"cpu {slot.cpu_percent:.0f}%"


def gpu_use(sample: GpuSample | None, index: int) -> str:
    """``gpu0 35% 3.1/16G``; ``gpu0 -`` without a reading."""
    if sample is None:
        return f"gpu{index} -"
    util = f"{sample.utilization_pct:.0f}%" if sample.utilization_pct is not None else "n/a"
    total = sample.memory_total_mib / 1024
    used = f"{sample.memory_used_mib / 1024:.1f}" if sample.memory_used_mib is not None else "?"
    return f"gpu{index} {util} {used}/{total:.0f}G"


# ----- nodes -------------------------------------------------------------------------------


def nodes_table(state: RunState, width: int) -> Table:
    """The machines agents joined from: each one's CPU, memory and GPUs as its agent read them."""
    table = _table("Nodes", width)
    table.add_column("node", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("slots", justify="right", no_wrap=True)
    table.add_column("cpu", justify="right", no_wrap=True)
    table.add_column("memory", justify="right", no_wrap=True)
    table.add_column("gpus", no_wrap=True, overflow="ellipsis", ratio=1)
    for node in state.nodes.values():
        slots = sum(s.name.startswith(f"{node.name}/") for s in state.slots)
        table.add_row(
            node.name,
            Text(node.state, style=STATE_STYLES.get(node.state, "")),
            str(slots),
            node_cpu(node),
            node_memory(node),
            "  ".join(gpu_use(sample, index) for index, sample in sorted(node.gpus.items())) or "-",
        )
    return table


def node_cpu(node: NodeView) -> str:
    """The node's CPU use of all its cores: ``35% of 16``."""
    if node.cpu_percent is None:
        return "-"
    return f"{node.cpu_percent:.0f}% of {node.cores}" if node.cores else f"{node.cpu_percent:.0f}%"


def node_memory(node: NodeView) -> str:
    if node.memory_used_mib is None or not node.memory_total_mib:
        return "-"
    return f"{node.memory_used_mib / 1024:.1f}/{node.memory_total_mib / 1024:.0f}G"


# ----- studies -----------------------------------------------------------------------------


def studies_table(state: RunState, width: int, now: float | None = None) -> Table:
    now = time.time() if now is None else now
    table = _table("Studies", width)
    table.add_column("study", no_wrap=True, overflow="ellipsis", max_width=max(12, width // 4))
    table.add_column("complete", justify="right", no_wrap=True)
    table.add_column("run", justify="right", no_wrap=True)
    table.add_column("pruned", justify="right", no_wrap=True)
    table.add_column("failed", justify="right", no_wrap=True)
    table.add_column("best", justify="right", no_wrap=True, overflow="ellipsis")
    several = len(state.studies) > 1  # one study's budget is the header's progress already
    if several:
        table.add_column("left", justify="right", no_wrap=True)
    table.add_column("best params", no_wrap=True, overflow="ellipsis", ratio=1)
    for study in state.studies:
        left = [budget_left(study, now)] if several else []
        table.add_row(
            study.name,
            str(study.complete),
            str(study.running),
            str(study.pruned),
            Text(str(study.failed), style="red" if study.failed else ""),
            best_text(study),
            *left,
            fmt.params(study.best_params, max(10, width - 45)),
        )
    return table


def best_text(study: StudyView) -> str:
    if study.best_values is None:
        return "-" if len(study.directions) <= 1 else "see Pareto"
    return f"#{study.best_number} {fmt.values(study.best_values)}"


# ----- recent trials -----------------------------------------------------------------------


def recent_table(state: RunState, width: int) -> Table:
    table = _table("Last trials", width)
    several = len(state.studies) > 1  # then each row says which study the trial belongs to
    table.add_column("trial", justify="right", no_wrap=True)
    if several:
        table.add_column("study", no_wrap=True, overflow="ellipsis", max_width=max(8, width // 5))
    table.add_column("slot", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True, overflow="ellipsis")
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("params / reason", no_wrap=True, overflow="ellipsis", ratio=1)
    for record in list(state.recent)[:RECENT_ROWS]:
        study = [record.study] if several else []
        table.add_row(
            str(record.number),
            *study,
            record.slot,
            Text(record.state, style=STATE_STYLES.get(record.state, "")),
            fmt.values(record.values),
            fmt.duration(record.duration),
            Text(detail_text(record, max(10, width - 45)), style="red" if record.reason else ""),
        )
    return table


def detail_text(record: TrialRecord, max_chars: int) -> str:
    """Why a trial failed; otherwise its parameters; after the named experiment it ran."""
    prefix = f"{record.experiment}: " if record.experiment else ""
    rest = max(0, max_chars - len(prefix))
    if record.reason:
        return fmt.shorten(prefix + fmt.shorten(record.reason, rest), max_chars)
    return fmt.shorten(prefix + fmt.params(record.params, rest), max_chars)


# ----- footer ------------------------------------------------------------------------------


def footer(state: RunState) -> Text:
    if state.stopping >= 2:
        return Text("stopping now: terminating running trials", style="bold red")
    if state.stopping == 1:
        running = sum(s.running for s in state.studies)
        return Text(
            f"stopping: waiting for {running} running trial(s); Ctrl+C again to terminate them",
            style="bold yellow",
        )
    return Text("Ctrl+C to stop (running trials finish); twice to terminate them", style="dim")


def _table(title: str, width: int) -> Table:
    # Full width when the terminal has it: the ratio columns take what is left.
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        expand=True,
        width=width,
        box=None,
        padding=(0, 1),
        header_style="bold dim",
        show_edge=False,
    )
