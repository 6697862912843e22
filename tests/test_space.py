"""The TOML search space: parsing, validation messages and conditional suggestion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hyperfleet.errors import ConfigError
from hyperfleet.sampling.space import load_space, parse_space

FULL_SPACE = """
[params.optimizer]
type = "categorical"
choices = ["sgd", "adam", "rmsprop"]

[params.lr]
type = "float"
low = 1e-5
high = 0.1
log = true

[params.layers]
type = "int"
low = 1
high = 9
step = 2

[params.dropout]
type = "float"
low = 0
high = 0.5
step = 0.1

[params.momentum]
type = "float"
low = 0.0
high = 0.99
when = { optimizer = ["sgd", "rmsprop"] }

[params.nesterov]
type = "categorical"
choices = [true, false]
when = { momentum = 0.9 }
"""


def test_a_full_space_becomes_optuna_distributions(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text(FULL_SPACE)
    space = load_space(path)
    assert space.names == ["optimizer", "lr", "layers", "dropout", "momentum", "nesterov"]
    assert space.conditional_names() == {"momentum", "nesterov"}

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"optimizer": "sgd"})
    trial = study.ask()
    values = space.suggest(trial)
    assert values["optimizer"] == "sgd"
    assert trial.distributions["optimizer"] == CategoricalDistribution(["sgd", "adam", "rmsprop"])
    assert trial.distributions["lr"] == FloatDistribution(1e-5, 0.1, log=True)
    assert trial.distributions["layers"] == IntDistribution(1, 9, step=2)
    assert trial.distributions["dropout"] == FloatDistribution(0.0, 0.5, step=0.1)
    assert trial.distributions["momentum"] == FloatDistribution(0.0, 0.99)
    assert values["layers"] in (1, 3, 5, 7, 9)
    assert "nesterov" not in values  # momentum is never exactly 0.9 when sampled uniformly


def test_conditional_parameters_follow_earlier_values() -> None:
    space = parse_space(
        {
            "params": {
                "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                "momentum": {"type": "float", "low": 0, "high": 1, "when": {"optimizer": "sgd"}},
                "nesterov": {
                    "type": "categorical",
                    "choices": [True, False],
                    "when": {"momentum": 0.5},
                },
            }
        }
    )
    adam = space.suggest(optuna.trial.FixedTrial({"optimizer": "adam"}))
    assert adam == {"optimizer": "adam"}
    sgd = space.suggest(
        optuna.trial.FixedTrial({"optimizer": "sgd", "momentum": 0.5, "nesterov": True})
    )
    assert sgd == {"optimizer": "sgd", "momentum": 0.5, "nesterov": True}
    other = space.suggest(optuna.trial.FixedTrial({"optimizer": "sgd", "momentum": 0.2}))
    assert other == {"optimizer": "sgd", "momentum": 0.2}


def _param(**table: Any) -> dict[str, Any]:
    return {"params": {"x": table}}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "declares no parameters"),
        ({"params": {}, "extra": 1}, "unknown top-level key"),
        (_param(low=0, high=1), "type is None"),
        (_param(type="number", low=0, high=1), "type is 'number'"),
        (_param(type="float", high=1), "low is missing"),
        (_param(type="float", low=2, high=1), "low (2.0) is greater than high (1.0)"),
        (_param(type="float", low=0, high=1, log=True), "log scale needs low"),
        (_param(type="int", low=0, high=8, log=True), "at least 1"),
        (_param(type="float", low=1e-3, high=1, log=True, step=0.1), "log and step"),
        (_param(type="float", low=0, high=1, step=0), "step must be positive"),
        (_param(type="float", low=0, high=1, log="yes"), "log must be true or false"),
        (_param(type="int", low=0.5, high=3), "low must be a whole number"),
        (_param(type="float", low="0", high=1), "low must be a finite number"),
        (_param(type="float", low=0, high=1, choices=[1]), "unknown key(s) ['choices']"),
        (_param(type="categorical", choices=[]), "non-empty list"),
        (_param(type="categorical", choices=[[1, 2]]), "choice [1, 2] is a list"),
        (_param(type="categorical", choices=["a"], low=0), "unknown key(s) ['low']"),
        (_param(type="float", low=0, high=1, when={"y": 1}), "refers to 'y'"),
        ({"params": {"2x": {"type": "float", "low": 0, "high": 1}}}, "letters, digits"),
        ({"params": {"trial_number": {"type": "int", "low": 0, "high": 1}}}, "reserved"),
    ],
)
def test_invalid_spaces_name_the_parameter_and_the_fix(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_space(data, source="space.toml")
    assert expected in str(caught.value)
    assert str(caught.value).startswith("space.toml")


def test_a_condition_must_use_a_value_the_earlier_parameter_can_take() -> None:
    data = {
        "params": {
            "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
            "momentum": {"type": "float", "low": 0, "high": 1, "when": {"optimizer": "SGD"}},
        }
    }
    with pytest.raises(ConfigError, match=r"'momentum'.*optimizer = 'SGD'"):
        parse_space(data)


def test_a_condition_may_not_refer_to_a_later_parameter() -> None:
    data = {
        "params": {
            "momentum": {"type": "float", "low": 0, "high": 1, "when": {"optimizer": "sgd"}},
            "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
        }
    }
    with pytest.raises(ConfigError, match="not declared before it"):
        parse_space(data)


def test_unreadable_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the search space file"):
        load_space(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[params.x\ntype = 'float'\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_space(broken)
