"""Poisoning and robust aggregation from config: what is refused, and why, before any training."""

import pytest

from fedjax_med.config import loading, schema
from fedjax_med.trainers import poisoning as poisoning_lib


def _config(*overrides):
    return loading.load_config("poisoning:tiny", list(overrides))


@pytest.mark.parametrize("method", ["median", "krum", "norm_bound"])
def test_robust_aggregation_with_secure_aggregation_is_refused_saying_why(method):
    with pytest.raises(schema.ConfigError, match="only their sum") as err:
        _config(
            f"--config.robust_aggregation.method={method}",
            "--config.secure_aggregation.method=secagg",
        )
    assert "robust_aggregation.method" in str(err.value)
    # The plain mean runs over secure aggregation (the malicious clients still poison it).
    config = _config("--config.secure_aggregation.method=secagg")
    assert config.poisoning.kind == "backdoor"


def test_fields_that_cannot_run_as_asked_are_refused():
    cases = [
        (
            ["--config.robust_aggregation.method=krum", "--config.federated.algorithm=scaffold"],
            "FedAvg-family",
        ),
        (["--config.poisoning.kind=none"], "poisoning.fraction"),
        (["--config.poisoning.fraction=0.0"], "poisoning.fraction"),
        (["--config.trainer=central"], "trainer='federated'"),
        (["--config.poisoning.kind=gradient_ascent"], "poisoning.kind"),
        (["--config.robust_aggregation.method=geomed"], "robust_aggregation.method"),
        (["--config.poisoning.poison_fraction=0.0"], "poisoning.poison_fraction"),
    ]
    for overrides, match in cases:
        with pytest.raises(schema.ConfigError, match=match):
            _config(*overrides)


def test_breakdown_point_is_checked_against_the_planned_cohort():
    config = _config("--config.robust_aggregation.method=krum")
    assert poisoning_lib.aggregator(config, 5).name == "krum"  # 5 > 2 f + 2
    with pytest.raises(ValueError, match="robust_aggregation.num_byzantine.*n > 2f \\+ 2"):
        poisoning_lib.aggregator(config, 4)
    bulyan = _config("--config.robust_aggregation.method=bulyan")
    with pytest.raises(ValueError, match="n >= 4f \\+ 3"):
        poisoning_lib.aggregator(bulyan, 6)
    assert loading.load_config("poisoning:bulyan").data.synthetic.num_sites == 7
