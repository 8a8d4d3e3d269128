"""Every config field is read by each trainer and data source, or refused there with its reason.

The runs below record every field the code reads by name (``config.section.field`` or
``section.get(field)``; whole-config copies such as ``to_dict`` do not count) and compare that
with :mod:`fedjax_med.config.scope`: a field a trainer never reads must be listed there, and a
field listed there must really be unread, so the tables cannot drift from the code.
"""

import contextlib
import os
import re
import tempfile

import ml_collections
import pytest

from fedjax_med.cli import main as cli
from fedjax_med.config import base, loading, schema, scope
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import image_folder, medmnist, synthetic, tfds_source, volumes
from fedjax_med.reporting import settings
from fedjax_med.trainers import central, federated
from fedjax_med.training import setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = [path for path, _ in schema.flatten(base.get_base_config())]
DEFAULTS = dict(schema.flatten(base.get_base_config()))
SOURCES = ("synthetic", "medmnist", "image_folder", "tfds", "volume_folder")


def _section_prefixes() -> dict[frozenset, str]:
    """Each section of the base config, by its set of keys, -> its dotted prefix."""
    out = {}

    def walk(section, prefix):
        out[frozenset(section.keys())] = prefix
        for key, value in section.items():
            path = prefix + key
            if isinstance(value, ml_collections.ConfigDict) and path not in schema.FREE_FORM:
                walk(value, path + ".")

    walk(base.get_base_config(), "")
    return out


@contextlib.contextmanager
def recorded_reads():
    """Records ``prefix.field`` for every by-name read of a config section while active."""
    prefixes, reads = _section_prefixes(), set()
    getattr_, get = ml_collections.ConfigDict.__getattr__, ml_collections.ConfigDict.get

    def record(section, key):
        prefix = prefixes.get(frozenset(section._fields))
        if prefix is not None and isinstance(key, str):
            reads.add(prefix + key)

    def recording_getattr(self, key):
        if not key.startswith("_"):
            record(self, key)
        return getattr_(self, key)

    def recording_get(self, key, default=None):
        record(self, key)
        return get(self, key, default)

    ml_collections.ConfigDict.__getattr__ = recording_getattr
    ml_collections.ConfigDict.get = recording_get
    try:
        yield reads
    finally:
        ml_collections.ConfigDict.__getattr__ = getattr_
        ml_collections.ConfigDict.get = get


def _config(spec, *overrides):
    return loading.load_config(spec, [f"--config.{o}" for o in overrides])


def _train(config):
    with tempfile.TemporaryDirectory() as workdir:
        trainer = (
            central.train_and_evaluate if config.trainer == "central" else federated.run_rounds
        )
        trainer(config, workdir, quiet=True)


# Each trainer: a few full runs (what the training loop reads) and plans of the other
# algorithms and mechanisms (what only their construction reads). The runs train a linear model:
# what a run reads does not depend on the model's layers, and it compiles in a fraction.
LINEAR = "model.name=linear"
CENTRAL_RUNS = [
    (
        "dp_sgd:patient,tiny",
        LINEAR,
        "privacy.accountant=pld",
        "privacy.microbatch_size=8",
        "privacy.augmult=2",
        "optimizer.schedule=cosine",
        "optimizer.warmup_steps=1",
        "data.max_examples=150",
    ),
    (
        "dp_sgd:tiny",
        LINEAR,
        "privacy.sampling=shuffle",
        "privacy.method=vmap",
        "privacy.per_layer_clipping=True",
        "train.steps=2",
        "train.ema_decay=0.9",
        "train.polyak_start=0",
    ),
]
CENTRAL_PLANS = [("dp_sgd:tiny", "optimizer.name=momentum", "optimizer.weight_decay=0.1")]
FEDERATED_RUNS = [
    (
        "quickstart:smoke",
        LINEAR,
        "federated.site_target_epsilons=hospital_0=5.0",
        "federated.personalization_steps=1",
        "federated.dropout_prob=0.2",
    ),
    ("dp_fedavg:tiny", LINEAR),
]
FEDERATED_PLANS = [
    *[
        ("fedavg:tiny", f"federated.algorithm={a}")
        for a in ("fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold")
    ],
    (
        "fedavg:tiny",
        "federated.backend=sharded",
        "federated.chunk_size=2",
        "federated.max_update_norm=5.0",
    ),
    (
        "dp_fedavg:tiny",
        "federated.adaptive_clipping=True",
        "federated.clients_per_round=40",
        "federated.partition.num_clients=50",
        "privacy.noise_multiplier=0.3",
    ),
    ("secagg_fedavg:tiny", "secure_aggregation.method=secagg_plus"),
    ("secagg_fedavg:ddp,tiny",),
    ("secagg_fedavg:tiny", "secure_aggregation.method=he_ckks"),
    ("fedprox_noniid:tiny",),
    (
        "fedavg:tiny",
        "federated.partition.method=quantity_skew",
        "federated.partition.num_clients=4",
    ),
    ("quickstart:smoke", "privacy.unit=patient"),
    ("poisoning:tiny",),
    ("poisoning:tiny", "robust_aggregation.method=multi_krum"),
    ("poisoning:tiny", "robust_aggregation.method=norm_bound"),
    ("fedavg:ditto,tiny",),
    ("fedavg:fedbn,tiny",),
]


@pytest.fixture(scope="module")
def reads_by_trainer():
    out = {}
    for trainer, runs, plans, build in (
        ("central", CENTRAL_RUNS, CENTRAL_PLANS, central.build_experiment),
        ("federated", FEDERATED_RUNS, FEDERATED_PLANS, federated.build_plan),
    ):
        configs = [_config(*spec) for spec in runs + plans]
        assert all(c.trainer == trainer for c in configs)
        with recorded_reads() as reads:
            for config in configs[: len(runs)]:
                _train(config)
            for config in configs[len(runs) :]:
                build(config)
        out[trainer] = reads
    return out


def _tiny_splits(*_, **__) -> dataset_lib.DatasetSplits:
    spec = synthetic.SyntheticSpec(num_sites=2, examples_per_site=60, image_size=16)
    return synthetic.generate(spec)


@pytest.fixture(scope="module")
def reads_by_source():
    """What the data setup of every trainer reads for each source (readers give tiny data)."""
    out = {}
    patched = [
        (medmnist, "load_medmnist"),
        (image_folder, "load_image_folder"),
        (tfds_source, "load_tfds"),
        (volumes, "load_volume_folder"),
    ]
    originals = [getattr(module, name) for module, name in patched]
    try:
        for module, name in patched:
            setattr(module, name, _tiny_splits)
        for source in SOURCES:
            config = base.get_base_config()
            data = config.data
            data.name, data.path, data.tfds_name = source, "x", "x"
            data.synthetic.examples_per_site, data.cache_dir = 60, "none"
            with recorded_reads() as reads:
                setup.build_data_and_model(config)  # what every trainer calls
            out[source] = reads
    finally:
        for (module, name), original in zip(patched, originals, strict=True):
            setattr(module, name, original)
    return out


@pytest.mark.parametrize("trainer", ["central", "federated"])
def test_every_field_is_read_by_each_trainer_or_refused_with_a_reason(reads_by_trainer, trainer):
    reads = reads_by_trainer[trainer]
    assert "data.name" in reads  # the trainer loads its data through training.setup
    ignored = [
        f
        for f in FIELDS
        if not f.startswith(("data.", scope.REPORT_SECTION))
        and f not in reads
        and scope.why_unread(f, trainer, "synthetic") is None
    ]
    assert not ignored, f"{trainer} reads neither these fields nor refuses them: {ignored}"
    # The table says no more than the truth: a field it calls unread is never read.
    stale = [
        f for f in reads if f in DEFAULTS and scope.why_unread(f, trainer, "synthetic") is not None
    ]
    assert not stale, f"scope.UNREAD_BY_TRAINER[{trainer!r}] lists fields it reads: {stale}"


@pytest.mark.parametrize("source", SOURCES)
def test_every_data_field_is_read_by_each_source_or_refused(reads_by_source, source):
    reads = reads_by_source[source]
    data_fields = [f for f in FIELDS if f.startswith("data.")]
    ignored = [f for f in data_fields if f not in reads and scope.why_unread(f, "", source) is None]
    assert not ignored, (
        f"data source {source!r} reads neither these fields nor refuses them: {ignored}"
    )
    stale = [f for f in reads if f in data_fields and scope.why_unread(f, "", source) is not None]
    assert not stale, f"scope.UNREAD_BY_SOURCE[{source!r}] lists fields it reads: {stale}"


def test_every_report_field_is_read_by_the_report():
    """report.* is read by ``fedjax-med report`` only (each attack reads its own knobs)."""
    folder = os.path.join(ROOT, "fedjax_med", "reporting")
    text = "".join(
        open(os.path.join(folder, f)).read() for f in os.listdir(folder) if f.endswith(".py")
    )
    for field in FIELDS:
        if field.startswith(scope.REPORT_SECTION):
            key = field.removeprefix(scope.REPORT_SECTION)
            assert re.search(rf"\b(r|report|config\.report)\.{key}\b", text), field


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_x"
    return {"x": 1}


def _every_refusal():
    for trainer in scope.UNREAD_BY_TRAINER:
        for field in FIELDS:
            if scope.why_unread(field, trainer, "synthetic") and not field.startswith("data."):
                yield trainer, "synthetic", field
    for source in scope.UNREAD_BY_SOURCE:
        for field in FIELDS:
            if field.startswith("data.") and scope.why_unread(field, "central", source):
                yield "central", source, field


@pytest.mark.parametrize("trainer, source, field", list(_every_refusal()))
def test_a_field_set_where_it_cannot_act_is_refused_naming_it(trainer, source, field):
    config = base.get_base_config()
    config.trainer, config.data.name = trainer, source
    *parents, key = field.split(".")
    section = config
    for p in parents:
        section = section[p]
    section[key] = _changed(DEFAULTS[field])
    with pytest.raises(schema.ConfigError, match=re.escape(f"config field '{field}'=")) as err:
        scope.check(config)
    assert scope.why_unread(field, trainer, source) in str(err.value)
    assert f"trainer={trainer!r}" in str(err.value)


def test_the_cli_refuses_a_federated_field_for_the_central_trainer(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    args = [
        "train",
        "--config",
        "quickstart:tiny",
        "--workdir",
        workdir,
        "--config.federated.rounds=3",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "config field 'federated.rounds'=3 has no effect with trainer='central'" in err
    assert not os.path.exists(workdir)


def test_report_settings_drop_the_other_trainers_fields_but_refuse_their_own():
    config = _config("privacy_report:tiny")
    resolved = {s.name: s.config for s in settings.resolve(config)}
    fed = resolved["fedavg"]
    assert config.train.steps != DEFAULTS["train.steps"]
    assert fed.train.steps == DEFAULTS["train.steps"]  # reset: the federated trainer reads rounds
    assert resolved["central"].train.steps == config.train.steps
    assert resolved["central"].federated.rounds == DEFAULTS["federated.rounds"]
    broken = ml_collections.ConfigDict(config.to_dict())
    broken.report.settings = {"f": {"trainer": "federated", "train": {"steps": 9}}}
    with pytest.raises(
        schema.ConfigError, match="report setting 'f': config field 'train.steps'=9"
    ):
        settings.resolve(broken)
