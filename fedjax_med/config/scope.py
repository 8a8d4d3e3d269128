"""Which config fields each trainer and data source reads: a field either acts or is refused.

Every field of :func:`fedjax_med.config.base.get_base_config` is read by some code path of each
trainer (``central``, ``federated``) and each data source, except the ones listed here, each with
the reason it cannot apply. :func:`check` refuses a config that sets such a field away from its
default, naming the field and the reason, so no setting is silently ignored. The privacy report
shares one config among settings of both trainers, so :func:`reset_unread` puts the fields a
setting's trainer does not read back to their defaults before the setting's own overrides.

tests/config/field_coverage_test.py runs each trainer and source with every read recorded and
checks the tables below against what the code actually reads.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from fedjax_med.config import base, schema

_FEDERATED_ONLY = "configures the federated simulation; trainer='central' trains on pooled data"

_CENTRAL_RECIPE = (
    "augmentation multiplicity is implemented in the central DP-SGD trainer only; local DP-SGD "
    "clips each site's plain per-example gradients"
)

_CENTRAL_FINETUNING = (
    "fine-tuning from a checkpoint is implemented in the central trainer only; federated rounds "
    "start from the model's initialisation"
)
_CENTRAL_AVERAGES = (
    "parameter averaging is implemented in the central trainer only; the federated server "
    "releases each round's global model"
)

# trainer -> field or section prefix -> why that trainer cannot read it.
UNREAD_BY_TRAINER: Mapping[str, Mapping[str, str]] = {
    "central": {
        "federated.": _FEDERATED_ONLY,
        "secure_aggregation.": _FEDERATED_ONLY,
        "robust_aggregation.": _FEDERATED_ONLY,
        "poisoning.": _FEDERATED_ONLY,
    },
    "federated": {
        "optimizer.name": "clients run federated.client_optimizer at federated.client_lr and "
        "the server the algorithm's optimizer at federated.server_lr",
        "optimizer.learning_rate": "clients step at federated.client_lr, the server at "
        "federated.server_lr",
        "optimizer.momentum": "clients run federated.client_optimizer; fedavgm's server "
        "momentum is federated.server_momentum",
        "optimizer.weight_decay": "clients run federated.client_optimizer without weight decay "
        "(fedprox's proximal term is federated.prox_mu)",
        "optimizer.schedule": "client and server learning rates are constant per round",
        "optimizer.warmup_steps": "client and server learning rates are constant per round",
        "train.batch_size": "each client samples federated.client_batch_size examples per step",
        "train.steps": "a run is federated.rounds rounds of federated.local_steps client steps",
        "train.eval_every": "the federated trainer evaluates every federated.eval_every rounds",
        "train.checkpoint_every": "the federated trainer checkpoints every "
        "federated.checkpoint_every rounds",
        "train.log_every": "the federated trainer logs once per round",
        "train.num_devices": "federated.backend places clients on the devices",
        "privacy.sampling": "every site Poisson-samples its rows (local DP-SGD), and DP-FedAvg "
        "its clients; fixed-size shuffled batches are the central trainer's",
        "privacy.overflow_prob": "local DP-SGD masks every row of a site on device (no padded "
        "chunks to overflow)",
        "train.ema_decay": _CENTRAL_AVERAGES,
        "train.trainable": _CENTRAL_FINETUNING,
        "model.init_from": _CENTRAL_FINETUNING,
        "train.polyak_start": _CENTRAL_AVERAGES,
        "privacy.augmult": _CENTRAL_RECIPE,
        "privacy.augmentations": _CENTRAL_RECIPE,
        "privacy.augment_shift": _CENTRAL_RECIPE,
    },
}

# data.name -> field or section prefix -> why that source cannot read it.
_SPLITS_GIVEN = "MedMNIST files come with their train, val and test splits"
_WINDOW = "only DICOM and NIfTI files (image_folder, volume_folder) have a display window"
UNREAD_BY_SOURCE: Mapping[str, Mapping[str, str]] = {
    "synthetic": {
        "data.path": "the synthetic benchmark is generated, not read from a file",
        "data.tfds_name": "only data.name='tfds' names a tensorflow-datasets dataset",
        "data.data_dir": "only data.name='tfds' reads a tensorflow-datasets folder",
        "data.sparse_labels": "only MedMNIST files can have gaps between class ids",
        "data.window": _WINDOW,
    },
    "medmnist": {
        "data.tfds_name": "only data.name='tfds' names a tensorflow-datasets dataset",
        "data.data_dir": "only data.name='tfds' reads a tensorflow-datasets folder",
        "data.cache_dir": "only the generated synthetic benchmark is cached",
        "data.synthetic.": "data.synthetic configures the generated benchmark only",
        "data.val_fraction": _SPLITS_GIVEN,
        "data.test_fraction": _SPLITS_GIVEN,
        "data.window": _WINDOW,
    },
    "image_folder": {
        "data.tfds_name": "only data.name='tfds' names a tensorflow-datasets dataset",
        "data.data_dir": "only data.name='tfds' reads a tensorflow-datasets folder",
        "data.cache_dir": "only the generated synthetic benchmark is cached",
        "data.synthetic.": "data.synthetic configures the generated benchmark only",
        "data.sparse_labels": "only MedMNIST files can have gaps between class ids",
    },
    "tfds": {
        "data.path": "a tensorflow-datasets dataset is found by data.tfds_name and data.data_dir",
        "data.cache_dir": "only the generated synthetic benchmark is cached",
        "data.synthetic.": "data.synthetic configures the generated benchmark only",
        "data.sparse_labels": "only MedMNIST files can have gaps between class ids",
        "data.window": _WINDOW,
    },
    "volume_folder": {
        "data.tfds_name": "only data.name='tfds' names a tensorflow-datasets dataset",
        "data.data_dir": "only data.name='tfds' reads a tensorflow-datasets folder",
        "data.cache_dir": "only the generated synthetic benchmark is cached",
        "data.synthetic.": "data.synthetic configures the generated benchmark only",
        "data.sparse_labels": "only MedMNIST files can have gaps between class ids",
    },
}

# Read by ``fedjax-med report`` (and reset by it in each setting), never by a trainer.
REPORT_SECTION = "report."


def why_unread(path: str, trainer: str, source: str) -> str | None:
    """Why ``trainer`` on data ``source`` does not read field ``path`` (``None``: it does)."""
    for table, key in ((UNREAD_BY_TRAINER, trainer), (UNREAD_BY_SOURCE, source)):
        for prefix, reason in table.get(key, {}).items():
            if path == prefix or (prefix.endswith(".") and path.startswith(prefix)):
                return reason
    if path.startswith(REPORT_SECTION):
        return "report.* configures fedjax-med report, which trains each of its settings"
    return None


def _defaults() -> dict[str, object]:
    return dict(schema.flatten(base.get_base_config()))


def unread_but_set(config: ml_collections.ConfigDict) -> list[tuple[str, object, str]]:
    """``(field, value, reason)`` for each field set away from its default that the run ignores."""
    defaults = _defaults()
    out = []
    for path, value in schema.flatten(config):
        reason = why_unread(path, config.trainer, config.data.name)
        if reason is not None and path in defaults and _differs(value, defaults[path]):
            out.append((path, value, reason))
    return out


def _differs(value: object, default: object) -> bool:
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(default, ml_collections.ConfigDict):
        default = default.to_dict()
    return value != default


def check(config: ml_collections.ConfigDict) -> None:
    """Refuses a training config that sets a field its trainer or data source does not read.

    Raises:
      ConfigError: ``config field 'F'=V has no effect with trainer=T and data.name=S (reason);
        leave it at its default D``, for the first such field.
    """
    defaults = _defaults()
    for path, value, reason in unread_but_set(config):
        raise schema.ConfigError(
            f"config field '{path}'={value!r} has no effect with trainer={config.trainer!r} and "
            f"data.name={config.data.name!r} ({reason}); leave it at its default "
            f"{defaults[path]!r}"
        )


def reset_unread(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with every field its trainer and source do not read set back to the default.

    For configs shared by several runs (the privacy report's task): a setting that switches the
    trainer does not inherit the other trainer's fields.
    """
    defaults = _defaults()
    out = ml_collections.ConfigDict(config.to_dict())
    for path, _ in schema.flatten(out):
        if path in defaults and why_unread(path, out.trainer, out.data.name) is not None:
            *parents, key = path.split(".")
            section = out
            for p in parents:
                section = section[p]
            default = defaults[path]
            if isinstance(default, ml_collections.ConfigDict):
                default = ml_collections.ConfigDict(default.to_dict())
            section[key] = default
    return out
