"""Every numeric config field is bounded: floats finite, ints within their int range."""

import math

import pytest

from fedjax_med.config import base, schema

FIELDS = schema.known_fields()
FLOATS = sorted(p for p, v in FIELDS.items() if isinstance(v, float))
INTS = sorted(p for p, v in FIELDS.items() if isinstance(v, int) and not isinstance(v, bool))


def _with(path, value):
    config = base.get_base_config()
    node = config
    *parents, leaf = path.split(".")
    for name in parents:
        node = node[name]
    node[leaf] = value
    return config


def test_the_walk_sees_every_numeric_field():
    assert {"data.std", "data.mean", "optimizer.learning_rate"} <= set(FLOATS)
    assert {"seed", "train.steps", "data.num_classes"} <= set(INTS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", FLOATS)
def test_non_finite_float_is_refused_naming_its_field(path, value):
    with pytest.raises(schema.ConfigError, match=rf"'{path}'=.* must be a finite number"):
        schema.validate(_with(path, value))


@pytest.mark.parametrize("path", INTS)
def test_out_of_range_int_is_refused_naming_its_field(path):
    lo, hi = schema.INT_RANGES.get(path, schema.INT_RANGE)
    for value in (hi + 1, 2**70, lo - 1):
        with pytest.raises(schema.ConfigError, match=rf"'{path}'={value} must be in \["):
            schema.validate(_with(path, value))


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("data.std", math.inf, r"'data.std'=inf must be a finite number"),
        # Before, nan slipped through and the error blamed the learning rate much later.
        ("data.mean", math.nan, r"'data.mean'=nan must be a finite number"),
        ("optimizer.learning_rate", math.inf, r"'optimizer.learning_rate'=inf must be"),
        ("seed", 2**70, r"'seed'=1180591620717411303424 must be in \[0, 4294967295\]"),
        ("seed", 2**32, r"'seed'=4294967296 must be in \[0, 4294967295\]"),
    ],
)
def test_issue_instances(path, value, message):
    with pytest.raises(schema.ConfigError, match=message):
        schema.validate(_with(path, value))


def test_largest_seed_is_accepted():
    schema.validate(_with("seed", 2**32 - 1))


def test_free_form_floats_must_be_finite():
    config = base.get_base_config()
    config.model.kwargs.dropout = math.nan
    with pytest.raises(schema.ConfigError, match=r"'model.kwargs.dropout'=nan must be a finite"):
        schema.validate(config)
