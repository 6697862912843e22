"""The campaign fair-share policy, driven by a tiny discrete-event simulator with a fake clock.

The simulator owns slots and studies (each with a trial duration and a budget of trials), asks
:func:`pick` to fill every free slot, advances the fake clock to the next trial end, and repeats.
At every event it checks the policy's promises that hold in every scenario: the chosen slot is
free and in the study's set, and no slot stays idle while an eligible study with work may use it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from hyperfleet.controller.policy import ShareBook, StudyDemand, pick
from hyperfleet.errors import ConfigError, HyperfleetError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimStudy:
    name: str
    slots: frozenset[str]
    duration: float
    budget: int
    weight: float = 1.0
    priority: int = 0
    stage: int = 0
    started: int = 0

    @property
    def has_work(self) -> bool:
        return self.started < self.budget

    def demand(self) -> StudyDemand:
        return StudyDemand(
            name=self.name,
            slots=self.slots,
            has_work=self.has_work,
            weight=self.weight,
            priority=self.priority,
            stage=self.stage,
        )


@dataclass(frozen=True)
class Launch:
    time: float
    study: str
    slot: str
    # studies (by name) that still had work just before this launch
    with_work: frozenset[str]


@dataclass(frozen=True)
class Snapshot:
    """Who holds which slot right after a fill, and who still had work then."""

    time: float
    holders: dict[str, str]
    with_work: frozenset[str]

    def count(self, study: str) -> int:
        return sum(1 for holder in self.holders.values() if holder == study)

    def slots_of(self, study: str) -> set[str]:
        return {slot for slot, holder in self.holders.items() if holder == study}


@dataclass
class Simulation:
    studies: list[SimStudy]
    slot_cost: dict[str, float]  # in the caller's order of preference
    sequential: bool = False
    clock: FakeClock = field(default_factory=FakeClock)
    launches: list[Launch] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.book = ShareBook(clock=self.clock)
        self.ends: dict[str, float] = {}  # running trials: slot -> end time
        self.holders: dict[str, str] = {}  # running trials: slot -> study
        self.by_name = {study.name: study for study in self.studies}

    def free_slots(self) -> list[str]:
        return [slot for slot in self.slot_cost if slot not in self.holders]

    def eligible(self) -> list[SimStudy]:
        """Independent statement of who may start a trial now (work, then lowest stage)."""
        with_work = [study for study in self.studies if study.has_work]
        if self.sequential and with_work:
            lowest = min(study.stage for study in with_work)
            with_work = [study for study in with_work if study.stage == lowest]
        return with_work

    def fill(self) -> None:
        while True:
            demands = [study.demand() for study in self.studies]
            with_work = frozenset(study.name for study in self.studies if study.has_work)
            choice = pick(demands, self.free_slots(), self.book, self.slot_cost, self.sequential)
            if choice is None:
                break
            name, slot = choice
            study = self.by_name[name]
            assert slot not in self.holders, f"{slot} given to {name} while busy"
            assert slot in study.slots, f"{name} was given {slot}, outside its slot set"
            assert study in self.eligible(), f"{name} picked while not eligible"
            study.started += 1
            self.book.start(name, slot, self.slot_cost[slot])
            self.holders[slot] = name
            self.ends[slot] = self.clock.now + study.duration
            self.launches.append(Launch(self.clock.now, name, slot, with_work))
        self.assert_no_idle_slot_usable()
        self.snapshots.append(
            Snapshot(
                self.clock.now,
                dict(self.holders),
                frozenset(study.name for study in self.studies if study.has_work),
            )
        )

    def assert_no_idle_slot_usable(self) -> None:
        for slot in self.free_slots():
            users = [study.name for study in self.eligible() if slot in study.slots]
            assert not users, f"t={self.clock.now}: {slot} idle while {users} could use it"

    def advance(self) -> None:
        """Move the clock to the next trial end and end every trial that ends then."""
        self.clock.now = min(self.ends.values())
        for slot in [slot for slot, end in self.ends.items() if end <= self.clock.now]:
            self.book.stop(slot)
            del self.ends[slot]
            del self.holders[slot]

    def run(self, horizon: float = float("inf")) -> None:
        """Run until every budget is spent and every trial ended, or until `horizon`."""
        self.fill()
        while self.ends and min(self.ends.values()) <= horizon:
            self.advance()
            self.fill()


def identical_slots(count: int, cost: float = 1.0) -> dict[str, float]:
    return {f"g{index}": cost for index in range(count)}


# --- shares follow the weights ---------------------------------------------------------------


@pytest.mark.parametrize("heavy_first", [True, False])
def test_weights_2_to_1_hold_4_to_2_at_every_moment(heavy_first: bool) -> None:
    slots = identical_slots(6)
    heavy = SimStudy("heavy", frozenset(slots), duration=1, budget=20, weight=2)
    light = SimStudy("light", frozenset(slots), duration=1, budget=10, weight=1)
    sim = Simulation([heavy, light] if heavy_first else [light, heavy], slots)
    sim.run()

    both_busy = [snap for snap in sim.snapshots if snap.with_work == {"heavy", "light"}]
    assert len(both_busy) == 4  # rounds at t=0..3; the budgets both run out in round 5
    for snap in both_busy:
        assert (snap.count("heavy"), snap.count("light")) == (4, 2), snap
    # The very first fill (every study at 0 running) already splits by weight.
    assert Counter(launch.study for launch in sim.launches[:6]) == {"heavy": 4, "light": 2}
    assert heavy.started == 20 and light.started == 10


def test_unequal_durations_slot_time_within_one_trial_of_weighted_share() -> None:
    slots = identical_slots(6)
    slow = SimStudy("slow", frozenset(slots), duration=3, budget=1000, weight=2)
    fast = SimStudy("fast", frozenset(slots), duration=1, budget=1000, weight=1)
    sim = Simulation([slow, fast], slots)
    horizon = 31.0
    sim.run(horizon=horizon)
    sim.clock.now = horizon

    received = {name: sim.book.usage(name) for name in ("slow", "fast")}
    assert sum(received.values()) == pytest.approx(6 * horizon)  # no slot ever idle
    one_slow_trial = 1.0 * slow.duration
    assert abs(received["slow"] - 2 / 3 * 6 * horizon) <= one_slow_trial, received
    assert abs(received["fast"] - 1 / 3 * 6 * horizon) <= one_slow_trial, received


def test_weights_2_to_1_on_5_slots_do_not_drift_over_time() -> None:
    # 5 slots cannot be split 2:1 exactly; the fifth slot must alternate between the studies
    # (through the usage tie-break) instead of always going to the same one.
    slots = identical_slots(5)
    slow = SimStudy("slow", frozenset(slots), duration=3, budget=1000, weight=2)
    fast = SimStudy("fast", frozenset(slots), duration=1, budget=1000, weight=1)
    sim = Simulation([slow, fast], slots)
    horizon = 60.0
    sim.run(horizon=horizon)
    sim.clock.now = horizon

    received = {name: sim.book.usage(name) for name in ("slow", "fast")}
    assert sum(received.values()) == pytest.approx(5 * horizon)
    one_slow_trial = 1.0 * slow.duration
    assert abs(received["slow"] - 2 / 3 * 5 * horizon) <= one_slow_trial, received


def test_equal_weights_odd_slot_count_usage_breaks_ties_and_stays_fair() -> None:
    slots = identical_slots(5)
    slow = SimStudy("slow", frozenset(slots), duration=3, budget=1000)
    fast = SimStudy("fast", frozenset(slots), duration=1, budget=1000)
    sim = Simulation([slow, fast], slots)
    horizon = 40.0
    sim.run(horizon=horizon)
    sim.clock.now = horizon

    received = {name: sim.book.usage(name) for name in ("slow", "fast")}
    assert sum(received.values()) == pytest.approx(5 * horizon)
    # The fifth slot alternates through the usage tie-break, so neither drifts away.
    assert abs(received["slow"] - received["fast"]) <= 2 * slow.duration, received
    # Never more than one slot apart at any moment.
    for snap in sim.snapshots:
        assert abs(snap.count("slow") - snap.count("fast")) <= 1, snap


def test_shares_are_measured_in_cost_not_in_slot_count() -> None:
    # One two-GPU slot (cost 2) and four half-GPU slots (cost 0.5 each), equal weights.
    slots = {"pair": 2.0, "h0": 0.5, "h1": 0.5, "h2": 0.5, "h3": 0.5}
    big = SimStudy("big", frozenset(slots), duration=1, budget=1)
    small = SimStudy("small", frozenset(slots) - {"pair"}, duration=1, budget=4)
    sim = Simulation([big, small], slots)
    sim.fill()

    first = sim.snapshots[0]
    assert first.slots_of("big") == {"pair"}
    assert first.slots_of("small") == {"h0", "h1", "h2", "h3"}
    assert sim.book.running_cost("big") == sim.book.running_cost("small") == 2.0


# --- budgets ---------------------------------------------------------------------------------


def test_finished_study_gives_its_slots_to_the_others_at_once() -> None:
    slots = identical_slots(4)
    short = SimStudy("short", frozenset(slots), duration=1, budget=3)
    long = SimStudy("long", frozenset(slots), duration=2, budget=12)
    sim = Simulation([short, long], slots)
    sim.run()

    at = {snap.time: snap for snap in sim.snapshots}
    assert at[0].count("short") == 2 and at[0].count("long") == 2
    # At t=1 `short` starts its last trial; the other freed slot goes to `long` although
    # `short` is below its fair share, because `short` has nothing left to start.
    assert at[1].count("short") == 1 and at[1].count("long") == 3
    assert at[2].holders == {slot: "long" for slot in slots}
    assert short.started == 3 and long.started == 12


def test_pick_returns_none_when_every_budget_is_spent() -> None:
    slots = identical_slots(2)
    demands = [StudyDemand("a", frozenset(slots), has_work=False)]
    assert pick(demands, list(slots), ShareBook(clock=FakeClock()), slots) is None


# --- slot sets -------------------------------------------------------------------------------


def test_cpu_and_gpu_studies_stay_on_their_own_slots() -> None:
    # CPU slots come first in the caller's order and the CPU study's weight asks for far more
    # than its two slots: neither may pull a study onto the other kind of slot.
    cpu_slots = {"cpu0": 4.0, "cpu1": 4.0}
    gpu_slots = identical_slots(4)
    slots = {**cpu_slots, **gpu_slots}
    cpu_study = SimStudy("cpu", frozenset(cpu_slots), duration=1, budget=6, weight=10)
    gpu_study = SimStudy("gpu", frozenset(gpu_slots), duration=2, budget=12, weight=10)
    sim = Simulation([cpu_study, gpu_study], slots)
    sim.run()

    used = {
        name: {launch.slot for launch in sim.launches if launch.study == name}
        for name in ("cpu", "gpu")
    }
    assert used == {"cpu": set(cpu_slots), "gpu": set(gpu_slots)}
    assert cpu_study.started == 6 and gpu_study.started == 12


def test_study_that_may_use_no_free_slot_is_passed_over() -> None:
    book = ShareBook(clock=FakeClock())
    slots = {"cpu0": 4.0, "g0": 1.0}
    gpu_only = StudyDemand("gpu", frozenset({"g0"}))
    assert pick([gpu_only], ["cpu0"], book, slots) is None
    cpu_only = StudyDemand("cpu", frozenset({"cpu0"}), weight=0.1)
    # `gpu` is further below its share, but cannot use cpu0.
    book.start("cpu", "cpu0-old", 4.0)
    assert pick([gpu_only, cpu_only], ["cpu0"], book, slots) == ("cpu", "cpu0")


# --- priorities ------------------------------------------------------------------------------


def test_high_priority_takes_every_slot_it_can_use_low_gets_the_rest_then_all() -> None:
    gpu = identical_slots(2)
    cpu = {"c0": 1.0, "c1": 1.0}
    slots = {**gpu, **cpu}
    high = SimStudy("high", frozenset(gpu), duration=1, budget=4, priority=1)
    # `low` is listed first and weighs 10x more: priority must still win.
    low = SimStudy("low", frozenset(slots), duration=1.5, budget=20, weight=10)
    sim = Simulation([low, high], slots)
    sim.run()

    while_high_has_work = [snap for snap in sim.snapshots if "high" in snap.with_work]
    assert while_high_has_work  # the scenario really overlaps
    for snap in sim.snapshots:
        if "high" in snap.with_work or snap.count("high"):
            assert snap.slots_of("low") <= set(cpu), snap
    for launch in sim.launches:
        if "high" in launch.with_work and launch.slot in gpu:
            assert launch.study == "high", launch
    # t=2: `high` ran its 4 trials (2 per round); from then on `low` holds everything.
    at = {snap.time: snap for snap in sim.snapshots}
    assert at[0].slots_of("high") == set(gpu) and at[0].slots_of("low") == set(cpu)
    assert at[2].holders == {slot: "low" for slot in slots}
    assert high.started == 4 and low.started == 20


def test_priority_compares_only_studies_that_can_use_a_free_slot() -> None:
    book = ShareBook(clock=FakeClock())
    slots = {"g0": 1.0, "c0": 1.0}
    high = StudyDemand("high", frozenset({"g0"}), priority=5)
    low = StudyDemand("low", frozenset({"g0", "c0"}), priority=-1)
    assert pick([low, high], ["g0", "c0"], book, slots) == ("high", "g0")
    assert pick([low, high], ["c0"], book, slots) == ("low", "c0")


# --- sequential mode -------------------------------------------------------------------------


def test_sequential_runs_stages_in_order_and_fills_every_usable_slot() -> None:
    slots = {"g0": 1.0, "g1": 1.0, "g2": 1.0, "c0": 4.0}
    # File order does not follow stages, and stage numbers need not be consecutive.
    late = SimStudy("late", frozenset(slots), duration=1, budget=4, stage=5)
    first_a = SimStudy("first_a", frozenset({"g0", "g1"}), duration=1, budget=2, stage=0)
    first_b = SimStudy("first_b", frozenset({"g1", "g2"}), duration=2, budget=2, stage=0)
    sim = Simulation([late, first_a, first_b], slots, sequential=True)
    sim.run()

    stage_of = {study.name: study.stage for study in sim.studies}
    for launch in sim.launches:
        if stage_of[launch.study] == 5:
            assert not launch.with_work & {"first_a", "first_b"}, launch
    at = {snap.time: snap for snap in sim.snapshots}
    # t=0: stage 0 uses all three GPU slots; c0 (only `late` may use it) waits.
    assert set(at[0].holders) == {"g0", "g1", "g2"}
    assert at[0].count("late") == 0
    # t=1: first_a starts its last trial; nothing of stage 0 is left to start, so `late`
    # takes every other free slot at once, while first_b's trials still run.
    assert at[1].count("first_a") == 1 and at[1].count("first_b") == 2
    assert at[1].slots_of("late") == {"c0"}
    assert at[1].with_work == {"late"}
    assert [study.started for study in sim.studies] == [4, 2, 2]


def test_sequential_stage_waits_for_earlier_study_whose_slots_are_busy() -> None:
    book = ShareBook(clock=FakeClock())
    slots = {"g0": 1.0, "c0": 4.0}
    book.start("early", "g0", 1.0)
    early = StudyDemand("early", frozenset({"g0"}), stage=0)
    later = StudyDemand("later", frozenset({"c0"}), stage=1)
    assert pick([early, later], ["c0"], book, slots, sequential=True) is None
    # Without sequential mode the same free slot is used at once.
    assert pick([early, later], ["c0"], book, slots) == ("later", "c0")


# --- no idle slot, over many random campaigns ------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_campaigns_never_idle_a_usable_slot_and_spend_every_budget(seed: int) -> None:
    rng = random.Random(seed)
    slots = {f"g{index}": rng.choice([0.5, 1.0, 2.0]) for index in range(rng.randint(1, 6))}
    slots |= {f"c{index}": float(rng.randint(1, 8)) for index in range(rng.randint(0, 3))}
    names = list(slots)
    studies = [
        SimStudy(
            f"s{index}",
            frozenset(rng.sample(names, rng.randint(1, len(names)))),
            duration=rng.choice([0.5, 1.0, 1.5, 3.0]),
            budget=rng.randint(0, 8),
            weight=rng.choice([0.5, 1.0, 2.0, 3.0]),
            priority=rng.randint(0, 2),
            stage=rng.randint(0, 2),
        )
        for index in range(rng.randint(1, 5))
    ]
    sim = Simulation(studies, slots, sequential=rng.random() < 0.5)
    sim.run()  # checks the no-idle rule after every event

    assert [study.started for study in studies] == [study.budget for study in studies]
    assert len(sim.launches) == sum(study.budget for study in studies)


# --- the book and the tie-breaks -------------------------------------------------------------


def test_share_book_tracks_running_cost_and_cost_seconds() -> None:
    clock = FakeClock()
    book = ShareBook(clock=clock)
    book.start("a", "g0", 0.5)
    book.start("a", "g1", 2.0)
    clock.now = 4.0
    assert (book.running("a"), book.running_cost("a")) == (2, 2.5)
    assert book.usage("a") == pytest.approx(10.0)  # 0.5*4 + 2*4, both still running
    book.stop("g1")
    clock.now = 6.0
    assert (book.running("a"), book.running_cost("a")) == (1, 0.5)
    assert book.usage("a") == pytest.approx(8.0 + 0.5 * 6)
    assert (book.running("b"), book.running_cost("b"), book.usage("b")) == (0, 0.0, 0.0)


def test_share_book_rejects_double_start_and_stop_of_idle_slot() -> None:
    book = ShareBook(clock=FakeClock())
    book.start("a", "g0", 1.0)
    with pytest.raises(ValueError, match="already held by study 'a'"):
        book.start("b", "g0", 1.0)
    with pytest.raises(ValueError, match="holds no trial"):
        book.stop("g1")


def test_equal_running_share_goes_to_lower_usage_then_file_order() -> None:
    clock = FakeClock()
    book = ShareBook(clock=clock)
    slots = {"g0": 1.0, "g1": 1.0}
    a = StudyDemand("a", frozenset(slots))
    b = StudyDemand("b", frozenset(slots))
    assert pick([a, b], ["g0"], book, slots) == ("a", "g0")
    assert pick([b, a], ["g0"], book, slots) == ("b", "g0")
    book.start("a", "old", 1.0)
    clock.now = 3.0
    book.stop("old")  # `a` used 3 cost-seconds, `b` none; both run nothing now
    assert pick([a, b], ["g0", "g1"], book, slots) == ("b", "g0")
    # Usage is divided by weight: with weight 4, `a`'s 3 cost-seconds count as 0.75.
    book.start("b", "other", 1.0)
    clock.now = 4.0
    book.stop("other")
    heavy_a = StudyDemand("a", frozenset(slots), weight=4)
    assert pick([b, heavy_a], ["g0"], book, slots) == ("a", "g0")


def test_weight_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="weight must be a positive number") as info:
        StudyDemand("x", frozenset({"g0"}), weight=0)
    assert isinstance(info.value, HyperfleetError)


def test_pick_rejects_free_slot_without_cost() -> None:
    with pytest.raises(ValueError, match="without a cost"):
        pick([StudyDemand("a", frozenset({"g9"}))], ["g9"], ShareBook(), {"g0": 1.0})


# ----- overlapping slots: a two-GPU study among half-GPU trials ------------------------------

HALVES = ("gpu0:2#0", "gpu1:2#0", "gpu0:2#1", "gpu1:2#1")
PAIR = "gpu0+1"


def run_overlapping(pair_priority: int) -> list[tuple[float, str]]:
    """Half-GPU study "half" (12 trials: 1 s on GPU 0, 1.5 s on GPU 1) and two-GPU study "pair"
    (3 trials of 1 s, its worker ready after the first event) on 2 GPUs, scheduled through the
    real ledger; returns (start time, study) in order of start."""
    from hyperfleet.resources.shapes import Ledger

    needs = {name: {f"gpu{name[3]}": 0.5} for name in HALVES}
    needs[PAIR] = {"gpu0": 1.0, "gpu1": 1.0}
    ledger, clock = Ledger(needs), FakeClock()
    book = ShareBook(clock)
    cost = {**dict.fromkeys(HALVES, 0.5), PAIR: 2.0}
    budgets, started = {"half": 12, "pair": 3}, Counter[str]()
    running: dict[str, float] = {}  # slot -> end time
    starts: list[tuple[float, str]] = []
    while len(starts) < sum(budgets.values()):
        while True:
            idle = [s for s in (*HALVES, PAIR) if s not in running]
            demands = [
                StudyDemand("half", frozenset(HALVES), started["half"] < budgets["half"]),
                StudyDemand(
                    "pair",
                    frozenset({PAIR}),
                    clock.now > 0 and started["pair"] < 3,
                    priority=pair_priority,
                ),
            ]
            choice = pick(
                demands,
                [s for s in idle if ledger.fits(s)],
                book,
                cost,
                blocked_slots=[s for s in idle if not ledger.fits(s)],
                overlaps=ledger.overlaps,
            )
            if choice is None:
                break
            study, slot = choice
            ledger.claim(slot)
            book.start(study, slot, cost[slot])
            running[slot] = clock.now + (1.5 if slot.startswith("gpu1:") else 1.0)
            started[study] += 1
            starts.append((clock.now, study))
        clock.now = min(running.values())
        for slot in [s for s, end in running.items() if end <= clock.now]:
            del running[slot]
            ledger.release(slot)
            book.stop(slot)
    return starts


def test_a_higher_priority_two_gpu_study_gets_its_gpus_as_the_halves_drain() -> None:
    starts = run_overlapping(pair_priority=1)
    pair_times = [t for t, study in starts if study == "pair"]
    half_times = [t for t, study in starts if study == "half"]
    # GPU 0's halves end at t=1, GPU 1's at t=1.5. GPU 0 is held free for the pair meanwhile
    # (no half restarts there), the pair starts as soon as GPU 1 drains and runs its three
    # trials back to back; the halves carry on after it.
    assert half_times[:4] == [0.0] * 4
    assert pair_times == [1.5, 2.5, 3.5]
    assert not [t for t in half_times if 0.0 < t < 4.5]
    assert len(half_times) == 12


def test_at_equal_priority_no_slot_idles_for_the_two_gpu_study() -> None:
    starts = run_overlapping(pair_priority=0)
    half_times = [t for t, study in starts if study == "half"]
    pair_times = [t for t, study in starts if study == "pair"]
    # Work-conserving: every half that frees up is taken again at once, so the pair gets both
    # GPUs only once the halves have started their whole budget.
    assert len(half_times) == 12 and len(pair_times) == 3
    assert min(pair_times) >= max(half_times)
    assert 1.0 in half_times  # GPU 0 restarted at once, not held for the pair


def test_the_chosen_study_gets_a_slot_whose_worker_holds_its_objective() -> None:
    slots = frozenset({"cpu#0", "cpu#1", "cpu#2"})
    demands = [StudyDemand("a", slots), StudyDemand("b", slots)]
    free = ["cpu#0", "cpu#1", "cpu#2"]
    costs = dict.fromkeys(free, 1.0)
    loaded = {"cpu#0": {"b"}, "cpu#1": set(), "cpu#2": {"a"}}
    assert pick(demands, free, ShareBook(), costs, loaded=loaded) == ("a", "cpu#2")
    assert pick(demands, free, ShareBook(), costs) == ("a", "cpu#0")  # caller order otherwise


def test_a_stage_whose_slot_loads_for_its_last_trial_is_not_over() -> None:
    slots = frozenset({"cpu#0", "cpu#1"})
    last_loading = StudyDemand("a", slots, has_work=False, stage=0, loading=True)
    demands = [last_loading, StudyDemand("b", slots, stage=1)]
    costs = {"cpu#0": 1.0, "cpu#1": 1.0}
    assert pick(demands, ["cpu#0"], ShareBook(), costs, sequential=True) is None
    done = StudyDemand("a", slots, has_work=False, stage=0)
    assert pick([done, demands[1]], ["cpu#0"], ShareBook(), costs, sequential=True) == (
        "b",
        "cpu#0",
    )
