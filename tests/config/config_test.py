"""Config loading, overrides and validation: every config validates, bad input is named."""

import glob
import os

import pytest

from fedjax_med.config import base, loading, schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def test_configs_exist():
    assert len(CONFIG_FILES) >= 4


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_validates(path):
    config = loading.load_config(path)
    assert config.train.steps >= 1
    with pytest.raises(AttributeError):  # locked: typos cannot create new fields
        config.train.stepz = 3


def test_base_config_is_valid():
    schema.validate(base.get_base_config())


def test_overrides_are_typed():
    config = loading.load_config(
        os.path.join(ROOT, "configs", "quickstart.py"),
        [
            "--config.train.steps=7",
            "--config.optimizer.learning_rate=0.05",
            "--config.data.name=medmnist",
            "--config.data.path=x.npz",
            "--config.model.kwargs.width=2",
        ],
    )
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optimizer.learning_rate == 0.05
    assert config.data.name == "medmnist"
    assert config.model.kwargs.width == 2


def test_config_file_argument():
    config = loading.load_config(os.path.join(ROOT, "configs", "quickstart.py") + ":tiny")
    assert config.train.steps < 20


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "--config.train.stepz=3",
            r"unknown config field 'train.stepz' .*did you mean 'train.steps'",
        ),
        ("--config.train.steps=ten", r"--config.train.steps='ten' is not a valid int"),
        ("--config.train.steps=0", r"'train.steps'=0 must be >= 1"),
        ("--config.optimizer.learning_rate=-1", r"'optimizer.learning_rate'=-1.0 must be > 0"),
        ("--config.data.name=imagenet", r"'data.name'='imagenet' must be one of"),
        ("--config.data.val_fraction=1.5", r"'data.val_fraction'=1.5 must be in \[0.0, 1.0\)"),
        ("--config.data.name=medmnist", r"'data.path' must name a file"),
        ("--config.optimizer.warmup_steps=5000", r"warmup_steps'=5000 must be <"),
    ],
)
def test_bad_overrides_name_the_field(override, match):
    with pytest.raises(schema.ConfigError, match=match):
        loading.load_config(os.path.join(ROOT, "configs", "quickstart.py"), [override])


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from fedjax_med.config import base\n"
        "def get_config():\n"
        "    c = base.get_base_config()\n"
        "    c.train.learning_rate = 0.1\n"
        "    return c\n"
    )
    with pytest.raises(schema.ConfigError, match="unknown config field 'train.learning_rate'"):
        loading.load_config(str(path))


def test_wrong_type_in_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from fedjax_med.config import base\n"
        "def get_config():\n"
        "    c = base.get_base_config()\n"
        "    with c.ignore_type():\n"
        "        c.train.batch_size = 'big'\n"
        "    return c\n"
    )
    with pytest.raises(schema.ConfigError, match="'train.batch_size' must be of type int"):
        loading.load_config(str(path))


def test_missing_config_file():
    with pytest.raises(schema.ConfigError, match="does not exist"):
        loading.load_config("no/such/config.py")


def test_json_round_trip():
    config = loading.load_config(os.path.join(ROOT, "configs", "quickstart.py"))
    again = loading.from_json_dict(loading.to_json_dict(config))
    assert loading.to_json_dict(again) == loading.to_json_dict(config)


@pytest.mark.parametrize(
    "overrides",
    [
        {"privacy.enabled": True, "privacy.noise_multiplier": 1.0},
        {
            "trainer": "federated",
            "federated.algorithm": "dp_fedavg",
            "privacy.noise_multiplier": 1.0,
        },
    ],
)
def test_per_site_normalisation_is_refused_under_dp(overrides):
    # Per-site statistics are computed from the private images without noise: not covered.
    config = base.get_base_config()
    config.data.normalization = "per_site"
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    with pytest.raises(schema.ConfigError, match="data.normalization"):
        schema.validate(config)
    config.data.normalization = "fixed"
    schema.validate(config)


@pytest.mark.parametrize(
    "field,value",
    [
        ("unit", "patient"),
        ("sampling", "shuffle"),
        ("per_layer_clipping", True),
        ("microbatch_size", 8),
    ],
)
def test_client_level_dp_refuses_fields_it_would_ignore(field, value):
    config = base.get_base_config()
    config.trainer = "federated"
    config.federated.algorithm = "dp_fedavg"
    config.privacy.noise_multiplier = 1.0
    config.data.normalization = "fixed"
    schema.validate(config)
    config.privacy[field] = value
    with pytest.raises(schema.ConfigError, match=f"privacy.{field}"):
        schema.validate(config)


def test_client_optimizer_is_checked_and_scaffold_needs_sgd():
    config = base.get_base_config()
    config.trainer = "federated"
    config.federated.client_optimizer = "adam"
    schema.validate(config)
    config.federated.algorithm = "scaffold"
    with pytest.raises(schema.ConfigError, match="federated.client_optimizer.*scaffold"):
        schema.validate(config)
    config.federated.client_optimizer = "rmsprop"
    with pytest.raises(schema.ConfigError, match="federated.client_optimizer"):
        schema.validate(config)


def test_replaced_field_names_its_successor():
    config = base.get_base_config()
    with pytest.raises(schema.ConfigError, match="secure_aggregation.dropout_rate"):
        loading.apply_overrides(config, ["--config.federated.secagg_threshold=0.5"])


def test_mechanism_field_states_what_runs_and_must_agree():
    config = base.get_base_config()
    config.data.normalization = "fixed"
    config.privacy.enabled = True
    config.privacy.noise_multiplier = 1.0
    assert schema.mechanism(schema.validate(config)) == "dp_sgd"
    config.privacy.mechanism = "dp_sgd"
    schema.validate(config)
    config.trainer = "federated"  # now privacy.enabled means local DP-SGD in every site
    with pytest.raises(schema.ConfigError, match="privacy.mechanism.*'local_dp_sgd'"):
        schema.validate(config)
    config.privacy.mechanism = "local_dp_sgd"
    assert schema.mechanism(schema.validate(config)) == "local_dp_sgd"


def test_config_variants_combine_and_unknown_ones_name_the_allowed():
    config = loading.load_config(os.path.join(ROOT, "configs", "dp_sgd.py") + ":patient,tiny")
    assert config.privacy.unit == "patient" and config.train.steps == 4
    with pytest.raises(ValueError, match="unknown argument 'fast'.*'patient', 'tiny'"):
        loading.load_config(os.path.join(ROOT, "configs", "dp_sgd.py") + ":fast")


def test_secure_aggregation_fields_moved_to_their_own_section():
    config = base.get_base_config()
    with pytest.raises(schema.ConfigError, match="secure_aggregation.method"):
        loading.apply_overrides(config, ["--config.federated.secure_aggregation=secagg"])
    config = loading.apply_overrides(config, ["--config.secure_aggregation.method=secagg"])
    assert config.secure_aggregation.method == "secagg"


def test_a_run_saved_before_the_secure_aggregation_section_still_loads():
    saved = loading.to_json_dict(base.get_base_config())
    for name in ("method", "clip", "dropout_rate", "corrupted_fraction", "distributed_dp"):
        del saved["secure_aggregation"][name]
    del saved["secure_aggregation"]
    saved["federated"].update(secure_aggregation="secagg", secagg_clip=0.25, secagg_threshold=0.5)
    del saved["privacy"]["mechanism"]  # added later too: takes its default
    config = loading.from_json_dict(saved)
    assert config.secure_aggregation.method == "secagg" and config.secure_aggregation.clip == 0.25
    assert config.privacy.mechanism == "auto"
