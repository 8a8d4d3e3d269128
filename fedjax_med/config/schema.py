"""Validation of experiment configs against the base config, with one clear message per error.

A config is valid when (1) every key exists in :func:`fedjax_med.config.base.get_base_config`
(except under the free-form ``model.kwargs``), (2) every value has the base value's type (an int
where a float is expected is accepted) and (3) every value lies in its allowed range, listed in
:data:`CHECKS`. Two rules hold for every numeric field, listed or not: a float must be finite
(also inside the free-form sections), and an int must lie in :data:`INT_RANGE` (or its entry in
:data:`INT_RANGES`), so nothing overflows a 32-bit JAX integer later. Errors are
:class:`ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections

from fedjax_med.config import base
from fedjax_med.data import augment, dicom

FREE_FORM = ("model.kwargs", "report.settings", "report.poisoning")


class ConfigError(ValueError):
    """A config field is unknown, has the wrong type or lies outside its allowed range."""


@dataclasses.dataclass(frozen=True)
class Check:
    """An allowed-value rule for one field: ``ok(value)`` and a human description."""

    ok: Callable[[Any], bool]
    allowed: str


def one_of(*values: str) -> Check:
    return Check(lambda v: v in values, "one of " + ", ".join(repr(v) for v in values))


def at_least(lo: float) -> Check:
    return Check(lambda v: v >= lo, f">= {lo}")


def greater_than(lo: float) -> Check:
    return Check(lambda v: v > lo, f"> {lo}")


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    return Check(ok, f"in {left}{lo}, {hi}{right}")


def _window_ok(value: str) -> bool:
    try:
        dicom.parse_window(value)
    except ValueError:
        return False
    return True


MECHANISMS = ("none", "dp_sgd", "local_dp_sgd", "dp_fedavg", "distributed_dp")

CHECKS: dict[str, Check] = {
    "seed": in_range(0, 2**32 - 1),
    "trainer": one_of("central", "federated"),
    "data.name": one_of("synthetic", "medmnist", "tfds", "image_folder", "volume_folder"),
    "data.image_size": Check(lambda v: v == 0 or v >= 8, "0 (keep) or >= 8"),
    "data.channels": one_of(0, 1, 3),
    "data.task": one_of("", "multiclass", "binary", "multilabel", "segmentation"),
    "data.max_examples": at_least(0),
    "data.num_classes": Check(lambda v: v == 0 or v >= 2, "0 (infer) or >= 2"),
    "data.val_fraction": in_range(0.0, 1.0, hi_open=True),
    "data.test_fraction": in_range(0.0, 1.0, lo_open=True, hi_open=True),
    "data.normalization": one_of("per_site", "fixed"),
    "data.std": greater_than(0.0),
    "data.synthetic.num_sites": at_least(1),
    "data.synthetic.examples_per_site": at_least(4),
    "data.synthetic.image_size": at_least(16),
    "data.synthetic.num_classes": in_range(2, 5),
    "data.synthetic.images_per_patient": at_least(1),
    "data.synthetic.depth": Check(lambda v: v == 0 or 8 <= v <= 256, "0 (2-D) or in [8, 256]"),
    "data.window": Check(_window_ok, "'header', 'none' or 'CENTRE,WIDTH' with width >= 1"),
    "data.synthetic.site_heterogeneity": in_range(0.0, 2.0),
    "federated.partition.method": one_of("by_site", "iid", "dirichlet", "quantity_skew"),
    "federated.partition.num_clients": at_least(0),
    "federated.partition.alpha": greater_than(0.0),
    "federated.partition.beta": greater_than(0.0),
    "model.name": Check(lambda v: isinstance(v, str) and v != "", "a registered model name"),
    "optimizer.name": one_of("sgd", "momentum", "adam", "adamw"),
    "optimizer.learning_rate": greater_than(0.0),
    "optimizer.momentum": in_range(0.0, 1.0, hi_open=True),
    "optimizer.weight_decay": at_least(0.0),
    "optimizer.schedule": one_of("constant", "cosine"),
    "optimizer.warmup_steps": at_least(0),
    "privacy.unit": one_of("example", "patient"),
    "privacy.max_images_per_patient": at_least(1),
    "privacy.clip_norm": greater_than(0.0),
    "privacy.noise_multiplier": at_least(0.0),
    "privacy.target_epsilon": at_least(0.0),
    "privacy.delta": in_range(0.0, 1.0, lo_open=True, hi_open=True),
    "privacy.accountant": one_of("rdp", "pld"),
    "privacy.sampling": one_of("poisson", "shuffle"),
    "privacy.overflow_prob": in_range(0.0, 1.0, lo_open=True, hi_open=True),
    "privacy.method": one_of("ghost", "vmap"),
    "privacy.microbatch_size": at_least(0),
    "privacy.noise_seed": one_of("reproducible", "secure"),
    "privacy.augmult": at_least(0),
    "train.trainable": one_of("all", "head", "head+norm"),
    "train.ema_decay": in_range(0.0, 1.0, hi_open=True),
    "train.polyak_start": at_least(-1),
    "privacy.augment_shift": at_least(0),
    "federated.algorithm": one_of(
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "scaffold",
        "dp_fedavg",
        "fedbn",
        "ditto",
    ),
    "federated.rounds": at_least(1),
    "federated.clients_per_round": at_least(0),
    "federated.local_steps": at_least(1),
    "federated.client_batch_size": at_least(1),
    "federated.client_lr": greater_than(0.0),
    "federated.client_optimizer": one_of("sgd", "adam"),
    "federated.server_lr": at_least(0.0),  # 0 = the algorithm's default
    "federated.server_momentum": in_range(0.0, 1.0, hi_open=True),
    "federated.server_tau": greater_than(0.0),
    "federated.prox_mu": at_least(0.0),
    "federated.ditto_lambda": at_least(0.0),
    "federated.dropout_prob": in_range(0.0, 1.0, hi_open=True),
    "federated.max_update_norm": at_least(0.0),
    "federated.backend": one_of("auto", "vmap", "sharded", "loop"),
    "federated.chunk_size": at_least(0),
    "federated.eval_every": at_least(1),
    "federated.checkpoint_every": at_least(1),
    "federated.target_quantile": in_range(0.0, 1.0, lo_open=True, hi_open=True),
    "federated.personalization_steps": at_least(0),
    "secure_aggregation.method": one_of("none", "secagg", "secagg_plus", "additive", "he_ckks"),
    "secure_aggregation.he_poly_modulus_degree": one_of(4096, 8192, 16384),
    "secure_aggregation.clip": greater_than(0.0),
    "privacy.mechanism": one_of("auto", *MECHANISMS),
    "secure_aggregation.dropout_rate": in_range(0.0, 1.0, hi_open=True),
    "secure_aggregation.corrupted_fraction": in_range(0.0, 0.5, hi_open=True),
    "secure_aggregation.distributed_dp": one_of("none", "discrete_gaussian", "skellam"),
    "robust_aggregation.method": one_of(
        "mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bound"
    ),
    "robust_aggregation.num_byzantine": at_least(0),
    "robust_aggregation.num_selected": at_least(0),
    "robust_aggregation.norm_bound": greater_than(0.0),
    "robust_aggregation.noise_std": at_least(0.0),
    "poisoning.kind": one_of(
        "none", "label_flip", "backdoor", "scale", "sign_flip", "little_is_enough"
    ),
    "poisoning.fraction": in_range(0.0, 1.0, hi_open=True),
    "poisoning.boost": at_least(0.0),
    "poisoning.z": at_least(0.0),
    "poisoning.target_label": at_least(0),
    "poisoning.trigger_size": at_least(1),
    "poisoning.poison_fraction": in_range(0.0, 1.0, lo_open=True),
    "train.batch_size": at_least(1),
    "train.steps": at_least(1),
    "train.eval_every": at_least(1),
    "train.eval_batch_size": at_least(1),
    "train.checkpoint_every": at_least(1),
    "train.log_every": at_least(1),
    "train.num_devices": at_least(0),
    "report.shadow_models": at_least(0),
    "report.shadow_steps": at_least(1),
    "report.shadow_lr": greater_than(0.0),
    "report.shadow_batch_size": at_least(0),
    "report.pool_size": at_least(4),
    "report.inversion_batch_size": in_range(1, 8),
    "report.inversion_local_steps": at_least(1),
    "report.inversion_steps": at_least(1),
    "report.inversion_restarts": at_least(1),
    "report.inversion_round": one_of("first", "last"),
    "report.audit_trials": at_least(8),
    "report.workers": in_range(0, 64),
    "report.audit_confidence": in_range(0.0, 1.0, lo_open=True, hi_open=True),
}


def flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields ``(dotted.path, value)`` for every leaf; free-form sections are one leaf."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping | ml_collections.ConfigDict) and path not in FREE_FORM:
            yield from flatten(value, prefix=f"{path}.")
        else:
            yield path, value


def known_fields() -> dict[str, Any]:
    """Dotted path -> default value for every field of the base config."""
    return dict(flatten(base.get_base_config()))


def suggest(path: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(path, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def type_matches(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, Mapping | ml_collections.ConfigDict):
        return isinstance(value, Mapping | ml_collections.ConfigDict)
    if default is None:
        return True
    return isinstance(value, type(default))


# Fields of earlier versions -> what replaced them (an old config fails with this message).
REPLACED_FIELDS = {
    **{
        f"federated.{old}": f"it is now secure_aggregation.{new} (the secure_aggregation section)"
        for old, new in (
            ("secure_aggregation", "method"),
            ("secagg_clip", "clip"),
            ("secagg_dropout_rate", "dropout_rate"),
            ("secagg_corrupted_fraction", "corrupted_fraction"),
            ("distributed_dp", "distributed_dp"),
        )
    },
    "federated.secagg_threshold": (
        "the Shamir threshold now follows Bell et al. (CCS 2020) from the cohort size, "
        "secure_aggregation.dropout_rate (the fraction of clients that may drop out) and "
        "secure_aggregation.corrupted_fraction (the fraction assumed to collude with the server)"
    ),
}


# Every int field lies in this range unless INT_RANGES says otherwise: counts, sizes and steps
# become int32 arrays on device (JAX without x64), so larger values would wrap silently.
INT_RANGE = (-(2**31), 2**31 - 1)
INT_RANGES = {
    # jax.random.PRNGKey keeps only the low 32 bits without x64: larger seeds collide with
    # small ones (PRNGKey(2**32 + 5) == PRNGKey(5)), so refuse them rather than alias runs.
    "seed": (0, 2**32 - 1),
}
# Float fields that may be +-inf or nan (none today; a field that means "unbounded" goes here).
NON_FINITE_OK: frozenset[str] = frozenset()


def check_number(path: str, value: Any) -> None:
    """The generic rules for a numeric leaf: floats finite, ints within their int range."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value) and path not in NON_FINITE_OK:
        raise ConfigError(f"config field '{path}'={value!r} must be a finite number")
    if isinstance(value, int):
        lo, hi = INT_RANGES.get(path, INT_RANGE)
        if not lo <= value <= hi:
            raise ConfigError(f"config field '{path}'={value!r} must be in [{lo}, {hi}]")


def _free_form_leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping | ml_collections.ConfigDict):
        for key, sub in value.items():
            yield from _free_form_leaves(sub, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, sub in enumerate(value):
            yield from _free_form_leaves(sub, f"{path}[{i}]")
    else:
        yield path, value


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field of ``config``; raises :class:`ConfigError` on the first problem."""
    known = known_fields()
    seen = dict(flatten(config))
    for path, value in seen.items():
        if path in FREE_FORM:
            for leaf_path, leaf in _free_form_leaves(value, path):
                if isinstance(leaf, float):  # ints in free-form sections have no known range
                    check_number(leaf_path, leaf)
        if path in REPLACED_FIELDS:
            raise ConfigError(f"config field '{path}' was replaced: {REPLACED_FIELDS[path]}")
        if path not in known:
            raise ConfigError(f"unknown config field '{path}'{suggest(path, known)}")
        default = known[path]
        if not type_matches(value, default):
            raise ConfigError(
                f"config field '{path}' must be of type {type(default).__name__}, "
                f"got {type(value).__name__} {value!r}"
            )
        check_number(path, value)
        check = CHECKS.get(path)
        if check is not None and not check.ok(value):
            raise ConfigError(f"config field '{path}'={value!r} must be {check.allowed}")
    missing = sorted(set(known) - set(seen))
    if missing:
        raise ConfigError(f"config is missing field '{missing[0]}'")
    validate_cross_fields(config)
    return config


# What selects each mechanism, for the error when privacy.mechanism disagrees with the fields.
_SELECTED_BY = {
    "none": "privacy.enabled=False, federated.algorithm != 'dp_fedavg', no distributed_dp",
    "dp_sgd": "trainer='central' and privacy.enabled=True",
    "local_dp_sgd": "trainer='federated', privacy.enabled=True and a non-DP algorithm",
    "dp_fedavg": "trainer='federated' and federated.algorithm='dp_fedavg'",
    "distributed_dp": "trainer='federated' and secure_aggregation.distributed_dp != 'none'",
}


def mechanism(config: ml_collections.ConfigDict) -> str:
    """The privacy mechanism a config runs, one of :data:`MECHANISMS` (the one derivation).

    ``privacy.enabled`` is DP-SGD under the central trainer and local DP-SGD in every site under
    the federated one; ``federated.algorithm = "dp_fedavg"`` is client-level DP-FedAvg and
    ``secure_aggregation.distributed_dp`` distributed DP over secure aggregation.
    ``privacy.mechanism`` states it explicitly (``"auto"``: derive it); :func:`validate` checks
    the two agree.
    """
    derived = _derived_mechanism(config)
    stated = config.privacy.get("mechanism", "auto")
    if stated not in ("auto", derived):
        raise ConfigError(
            f"config field 'privacy.mechanism'={stated!r} needs {_SELECTED_BY[stated]}; the "
            f"other fields select {derived!r} ({_SELECTED_BY[derived]})"
        )
    return derived


def _derived_mechanism(config: ml_collections.ConfigDict) -> str:
    if config.trainer != "federated":
        return "dp_sgd" if config.privacy.enabled else "none"
    f = config.federated
    if config.secure_aggregation.distributed_dp != "none":
        return "distributed_dp"
    if f.algorithm == "dp_fedavg":
        return "dp_fedavg"
    return "local_dp_sgd" if config.privacy.enabled else "none"


def _check_mechanism_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses privacy fields that the configured mechanism would not honour."""
    p, used = config.privacy, mechanism(config)
    if used in ("dp_fedavg", "distributed_dp"):
        # Client-level mechanisms: the unit is the client; clients train without DP-SGD.
        ignored = {
            "privacy.unit": p.unit != "example",
            "privacy.sampling": p.sampling != "poisson",
            "privacy.per_layer_clipping": p.per_layer_clipping,
            "privacy.microbatch_size": p.microbatch_size != 0,
        }
        for field, set_by_user in ignored.items():
            if set_by_user:
                raise ConfigError(
                    f"config field '{field}' has no effect under {used} (a client-level "
                    "mechanism: the unit of privacy is the whole client, clipped as one "
                    "update); leave it at its default"
                )
    if used == "local_dp_sgd" and p.sampling != "poisson":
        raise ConfigError(
            "config field 'privacy.sampling' must be 'poisson' for local DP-SGD (each site "
            "Poisson-samples its rows on device; fixed-size batches are not implemented there)"
        )


def _check_data_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses data and partition fields that the chosen source would ignore or contradict."""
    data, part = config.data, config.federated.partition
    if data.sparse_labels and data.name != "medmnist":
        raise ConfigError(
            "config field 'data.sparse_labels' applies only to data.name='medmnist' (the other "
            f"sources name their classes, so their ids are dense); it has no effect with "
            f"data.name={data.name!r}"
        )
    if data.name == "synthetic":
        s = data.synthetic
        if data.num_classes not in (0, s.num_classes):
            raise ConfigError(
                f"config field 'data.num_classes'={data.num_classes} must be 0 or "
                f"data.synthetic.num_classes={s.num_classes} (the synthetic benchmark has that "
                "many classes)"
            )
        binary_ok = data.task == "binary" and s.num_classes == 2
        if data.task not in ("", "multiclass", "segmentation") and not binary_ok:
            raise ConfigError(
                f"config field 'data.task'={data.task!r} does not fit the synthetic benchmark "
                f"(multiclass with data.synthetic.num_classes={s.num_classes}; 'binary' needs 2; "
                "'segmentation' labels each pixel with its lesion's class)"
            )
        if part.method == "by_site" and part.num_clients not in (0, s.num_sites):
            raise ConfigError(
                f"config field 'federated.partition.num_clients'={part.num_clients} must be 0 or "
                f"data.synthetic.num_sites={s.num_sites} with partition.method='by_site' (each "
                "site is one client); use iid, dirichlet or quantity_skew for another number"
            )


def validate_cross_fields(config: ml_collections.ConfigDict) -> None:
    """Rules that involve several fields."""
    data = config.data
    if data.name in ("medmnist", "image_folder", "volume_folder") and not data.path:
        raise ConfigError(f"config field 'data.path' must name a file or folder for {data.name}")
    if data.name == "tfds" and not data.tfds_name:
        raise ConfigError("config field 'data.tfds_name' must name a tensorflow-datasets dataset")
    if data.val_fraction + data.test_fraction >= 1.0:
        raise ConfigError(
            "config fields 'data.val_fraction' + 'data.test_fraction' must be < 1, got "
            f"{data.val_fraction} + {data.test_fraction}"
        )
    _check_data_fields(config)
    privacy = config.privacy
    if privacy.enabled and privacy.noise_multiplier == 0 and privacy.target_epsilon == 0:
        raise ConfigError(
            "config fields 'privacy.noise_multiplier' or 'privacy.target_epsilon' must be > 0 "
            "when privacy.enabled (set the noise, or the epsilon to calibrate it for)"
        )
    if privacy.enabled and privacy.sampling == "shuffle" and privacy.accountant != "rdp":
        raise ConfigError(
            "config field 'privacy.accountant' must be 'rdp' with privacy.sampling='shuffle' "
            "(dp_accounting's PLD has no sampling-without-replacement event)"
        )
    if mechanism(config) != "none" and data.normalization == "per_site":
        raise ConfigError(
            "config field 'data.normalization'='per_site' standardises with each site's training "
            "statistics, which no DP guarantee here covers (they are computed from the private "
            "images without noise); use 'fixed' with data.mean and data.std under privacy"
        )
    _check_mechanism_fields(config)
    if privacy.enabled and privacy.unit == "patient" and privacy.sampling != "poisson":
        raise ConfigError(
            "config field 'privacy.sampling' must be 'poisson' for privacy.unit='patient'"
        )
    if config.trainer == "federated":
        f = config.federated
        if (
            f.algorithm == "dp_fedavg"
            and privacy.noise_multiplier == 0
            and (privacy.target_epsilon == 0)
        ):
            raise ConfigError(
                "config fields 'privacy.noise_multiplier' or 'privacy.target_epsilon' must be > 0 "
                "for federated.algorithm='dp_fedavg'"
            )
        if privacy.enabled and f.algorithm in ("dp_fedavg", "scaffold"):
            raise ConfigError(
                "config field 'privacy.enabled' (local DP-SGD in every site) must be False with "
                f"federated.algorithm={f.algorithm!r}"
            )
        if f.algorithm == "scaffold" and f.client_optimizer != "sgd":
            raise ConfigError(
                f"config field 'federated.client_optimizer'={f.client_optimizer!r} must be 'sgd' "
                "with federated.algorithm='scaffold' (its control variates assume SGD steps)"
            )
        sa = config.secure_aggregation
        if sa.distributed_dp != "none" and (
            sa.method not in ("secagg", "secagg_plus") or privacy.noise_multiplier <= 0
        ):
            raise ConfigError(
                "config field 'secure_aggregation.distributed_dp' needs "
                "secure_aggregation.method in ('secagg', 'secagg_plus') and "
                "privacy.noise_multiplier > 0"
            )
        if sa.method == "he_ckks" and importlib.util.find_spec("tenseal") is None:
            raise ConfigError(
                "config field 'secure_aggregation.method'='he_ckks' needs TenSEAL: "
                "pip install 'fedjax_med[he]'"
            )
        if privacy.enabled and privacy.noise_multiplier == 0:
            raise ConfigError(
                "config field 'privacy.noise_multiplier' must be > 0 for local DP-SGD "
                "(privacy.target_epsilon is each site's budget)"
            )
    _check_site_model_fields(config)
    _check_poisoning_fields(config)
    broken = [m for m in config.report.broken_mechanisms.split(",") if m.strip()]
    allowed = ("no_noise", "wrong_scale", "no_clipping")
    if any(m.strip() not in allowed for m in broken):
        raise ConfigError(
            f"config field 'report.broken_mechanisms'={config.report.broken_mechanisms!r} must "
            f"be a comma-separated subset of {allowed} (or empty)"
        )
    _check_utility_fields(config)
    if config.optimizer.warmup_steps >= config.train.steps:
        raise ConfigError(
            f"config field 'optimizer.warmup_steps'={config.optimizer.warmup_steps} must be < "
            f"train.steps={config.train.steps}"
        )


def _check_utility_fields(config: ml_collections.ConfigDict) -> None:
    """The DP-SGD utility recipe: augmentation multiplicity's operations."""
    if config.trainer == "central" and config.privacy.augmult > 0 and not config.privacy.enabled:
        raise ConfigError(
            f"config field 'privacy.augmult'={config.privacy.augmult} averages per-example "
            "gradients before DP-SGD's clipping and needs privacy.enabled=True; leave it at 0"
        )
    spec = config.privacy.augmentations
    try:
        augment.parse_operations(spec)
    except ValueError:
        raise ConfigError(
            f"config field 'privacy.augmentations'={spec!r} must be distinct comma-separated "
            f"names from {augment.OPERATIONS}"
        ) from None


def _check_site_model_fields(config: ml_collections.ConfigDict) -> None:
    """FedBN and Ditto: per-site models that other fields must not contradict."""
    f = config.federated
    if config.trainer != "federated" or f.algorithm not in ("fedbn", "ditto"):
        return
    if f.personalization_steps:
        raise ConfigError(
            f"config field 'federated.personalization_steps'={f.personalization_steps} must be 0 "
            f"with federated.algorithm={f.algorithm!r}: its sites already keep models of their "
            "own (report.json per_site personal_test_*)"
        )
    if f.algorithm == "ditto" and not f.ditto_lambda * f.client_lr < 2:
        raise ConfigError(
            f"config field 'federated.ditto_lambda'={f.ditto_lambda} must be in [0, "
            f"{2 / f.client_lr:g}) = [0, 2 / federated.client_lr): the personal model's "
            "proximal SGD step (Ditto, Algorithm 1) diverges beyond it"
        )


def _check_poisoning_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses robust aggregation and poisoning where they cannot run as asked."""
    robust, attack = config.robust_aggregation.method, config.poisoning
    if config.trainer != "federated" and (robust != "mean" or attack.kind != "none"):
        raise ConfigError(
            "config fields 'robust_aggregation.method' and 'poisoning.kind' need "
            "trainer='federated' (they are about the clients of a federation)"
        )
    if (attack.kind == "none") != (attack.fraction == 0):
        raise ConfigError(
            f"config field 'poisoning.fraction'={attack.fraction} must be > 0 exactly when "
            f"poisoning.kind != 'none' (got kind={attack.kind!r})"
        )
    if robust == "mean":
        return
    if config.secure_aggregation.method != "none":
        raise ConfigError(
            f"config field 'robust_aggregation.method'={robust!r} cannot run with "
            f"secure_aggregation.method={config.secure_aggregation.method!r}: a robust rule "
            "needs every client's individual update, and secure aggregation shows the server "
            "only their sum. Use robust_aggregation.method='mean' with secure aggregation, or "
            "federated.algorithm='dp_fedavg', whose clipping and noise compose with a secure sum"
        )
    if config.federated.algorithm in ("dp_fedavg", "scaffold"):
        raise ConfigError(
            f"config field 'robust_aggregation.method'={robust!r} needs a FedAvg-family "
            f"algorithm; federated.algorithm={config.federated.algorithm!r} keeps its own sum "
            "(DP-FedAvg's noise is calibrated to a clipped sum; SCAFFOLD's control variates are "
            "averaged beside the deltas)"
        )
