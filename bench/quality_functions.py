"""Test functions for ``parallel_quality.py``: each suggests its parameters on an Optuna trial
and returns the value to minimise; ``MINIMA`` holds each one's global minimum."""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna

_H6_ALPHA = (1.0, 1.2, 3.0, 3.2)
_H6_A = (
    (10.0, 3.0, 17.0, 3.5, 1.7, 8.0),
    (0.05, 10.0, 17.0, 0.1, 8.0, 14.0),
    (3.0, 3.5, 1.7, 10.0, 17.0, 8.0),
    (17.0, 8.0, 0.05, 10.0, 0.1, 14.0),
)
_H6_P = (
    (0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886),
    (0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991),
    (0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650),
    (0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381),
)


def hartmann6(trial: optuna.Trial) -> float:
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(6)]
    total = 0.0
    for alpha, a, p in zip(_H6_ALPHA, _H6_A, _H6_P, strict=True):
        inner = sum(aj * (xj - pj) ** 2 for aj, xj, pj in zip(a, x, p, strict=True))
        total += alpha * math.exp(-inner)
    return -total


def branin(trial: optuna.Trial) -> float:
    x1 = trial.suggest_float("x1", -5.0, 10.0)
    x2 = trial.suggest_float("x2", 0.0, 15.0)
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def levy10(trial: optuna.Trial) -> float:
    x = [trial.suggest_float(f"x{i}", -10.0, 10.0) for i in range(10)]
    w = [1 + (xi - 1) / 4 for xi in x]
    head = math.sin(math.pi * w[0]) ** 2
    middle = sum((wi - 1) ** 2 * (1 + 10 * math.sin(math.pi * wi + 1) ** 2) for wi in w[:-1])
    tail = (w[-1] - 1) ** 2 * (1 + math.sin(2 * math.pi * w[-1]) ** 2)
    return head + middle + tail


# A surrogate of a model-selection search: which model family (categorical), a tree depth
# (integer) and two log-scale rates; each family has its own best depth and rates, and its own
# floor, as validation error does. The global minimum is the "boost" family's floor.
_FAMILIES = {
    "linear": (0.12, 1.0, -2.0, -4.0),  # floor, weight of depth, best log10 lr, best log10 reg
    "forest": (0.06, 0.0, -1.0, -3.0),
    "boost": (0.03, 0.5, -1.3, -2.0),
}
_BEST_DEPTH = {"linear": 1, "forest": 14, "boost": 6}


def mixed(trial: optuna.Trial) -> float:
    family = trial.suggest_categorical("model", list(_FAMILIES))
    depth = trial.suggest_int("depth", 1, 16)
    lr = math.log10(trial.suggest_float("lr", 1e-4, 1.0, log=True))
    reg = math.log10(trial.suggest_float("reg", 1e-6, 1.0, log=True))
    floor, depth_weight, best_lr, best_reg = _FAMILIES[family]
    depth_term = depth_weight * ((depth - _BEST_DEPTH[family]) / 8) ** 2
    rate_term = 0.04 * (lr - best_lr) ** 2 + 0.01 * (reg - best_reg) ** 2
    coupling = 0.02 * (lr - best_lr) * (depth - _BEST_DEPTH[family]) / 8  # rates and depth trade
    return floor + 0.1 * depth_term + rate_term + abs(coupling)


FUNCTIONS: dict[str, Callable[[optuna.Trial], float]] = {
    "hartmann6": hartmann6,
    "branin": branin,
    "levy10": levy10,
    "mixed": mixed,
}
MINIMA = {"hartmann6": -3.32237, "branin": 0.397887, "levy10": 0.0, "mixed": 0.03}
