"""The settings of a privacy report: one training config per ``report.settings`` entry.

A report config is an ordinary config (the shared task: data, model, optimizer, training
length) plus ``report.settings``, a mapping from a setting's name to nested overrides of that
config. Each setting's config is the task with its overrides applied, validated like any
``train`` config; what the setting defends with (DP-SGD, client-level DP, secure aggregation) is
read off that resolved config, so the attacks and audits match what actually ran.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from fedjax_med.config import base, schema, scope

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")

DESCRIPTIONS = {
    "dp_sgd": "DP-SGD (example-level DP)",
    "local_dp_sgd": "DP-SGD inside every site (example-level DP per site)",
    "dp_fedavg": "DP-FedAvg (client-level DP)",
    "secure_aggregation": "secure aggregation (server sees only the sum)",
    "distributed_dp": "distributed DP (client noise under secure aggregation)",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One trained configuration of a report.

    Attributes:
      name: the key in ``report.settings`` (also the run's folder name).
      config: the resolved, validated and locked training config.
      defences: which of :data:`DESCRIPTIONS` the config turns on, in that order.
    """

    name: str
    config: ml_collections.ConfigDict

    @property
    def federated(self) -> bool:
        return self.config.trainer == "federated"

    @property
    def mechanism(self) -> str:
        """The privacy mechanism the config runs (:func:`fedjax_med.config.schema.mechanism`)."""
        return schema.mechanism(self.config)

    @property
    def defences(self) -> tuple[str, ...]:
        c = self.config
        found = [] if self.mechanism in ("none", "distributed_dp") else [self.mechanism]
        if self.federated and c.secure_aggregation.method != "none":
            found.append("secure_aggregation")
        if self.mechanism == "distributed_dp":
            found.append("distributed_dp")
        return tuple(found)

    @property
    def private(self) -> bool:
        return self.mechanism in ("dp_sgd", "local_dp_sgd", "dp_fedavg")

    def describe(self) -> str:
        base = "federated (FedAvg family)" if self.federated else "centralized (pooled data)"
        if not self.defences:
            return f"{base}, no defence"
        return base + ", " + ", ".join(DESCRIPTIONS[d] for d in self.defences)


def _merge(node: ml_collections.ConfigDict, overrides: Mapping[str, Any], path: str) -> None:
    """Writes nested ``overrides`` into ``node``; unknown fields are errors naming the path."""
    known = schema.known_fields()
    for key, value in overrides.items():
        dotted = f"{path}.{key}" if path else str(key)
        free = dotted in schema.FREE_FORM
        if key not in node:  # every field exists in the base config
            raise schema.ConfigError(
                f"unknown config field '{dotted}'{schema.suggest(dotted, known)}"
            )
        if isinstance(value, Mapping | ml_collections.ConfigDict) and not free:
            if not isinstance(node[key], ml_collections.ConfigDict):
                raise schema.ConfigError(f"config field '{dotted}' is not a section")
            _merge(node[key], value, dotted)
        else:
            with node.ignore_type():
                node[key] = copy.deepcopy(value)


def resolve(config: ml_collections.ConfigDict) -> list[Setting]:
    """Every setting of ``config.report.settings`` as a validated training config.

    Raises:
      schema.ConfigError: no settings, a bad name, or a setting whose config is invalid (the
        message names the setting).
    """
    settings = config.report.settings
    if not settings:
        raise schema.ConfigError(
            "config field 'report.settings' must name at least one setting to train"
        )
    return sorted(_resolve(config, settings, "report setting"), key=_order)


def resolve_poisoning(config: ml_collections.ConfigDict) -> list[Setting]:
    """Every setting of ``config.report.poisoning`` (none is fine): no attack first.

    Each is a federated run with malicious clients (``poisoning``) and a server defence
    (``robust_aggregation``, DP-FedAvg); the report reads its clean accuracy and attack success.
    """
    resolved = _resolve(config, config.report.poisoning, "report poisoning setting")
    for setting in resolved:
        if not setting.federated:
            raise schema.ConfigError(
                f"report poisoning setting {setting.name!r} must set trainer='federated'"
            )
    # No attack first, then each attack undefended, then its defences.
    return sorted(
        resolved,
        key=lambda s: (
            s.config.poisoning.kind != "none",
            s.config.poisoning.kind,
            poisoning_defence(s.config) != "none",
            s.name,
        ),
    )


def poisoning_defence(config: ml_collections.ConfigDict) -> str:
    """The server-side defence a poisoning setting runs: its rule, DP-FedAvg, or ``"none"``."""
    if config.robust_aggregation.method != "mean":
        return config.robust_aggregation.method
    if config.federated.algorithm == "dp_fedavg":
        return "dp_fedavg"
    return "none"


def _resolve(config, settings, what: str) -> list[Setting]:
    task = ml_collections.ConfigDict(config.to_dict())
    # A setting's training does not depend on how it is attacked: the report section is reset,
    # so changing report.* knobs keeps finished runs reusable.
    task.report = base.get_base_config().report
    resolved = []
    for name, overrides in settings.items():
        if not NAME_PATTERN.match(name):
            raise schema.ConfigError(
                f"{what} name {name!r} must use letters, digits, '_' or '-' only"
            )
        if not isinstance(overrides, Mapping | ml_collections.ConfigDict):
            raise schema.ConfigError(
                f"{what} {name!r} must be a mapping of config overrides, got "
                f"{type(overrides).__name__}"
            )
        try:
            # The task's fields that this setting's trainer and source do not read are put back
            # to their defaults (a federated setting does not inherit train.steps); the
            # setting's own overrides are then checked like any training config's.
            merged = copy.deepcopy(task)
            _merge(merged, overrides, "")
            setting_config = copy.deepcopy(task)
            setting_config.trainer, setting_config.data.name = merged.trainer, merged.data.name
            setting_config = scope.reset_unread(setting_config)
            _merge(setting_config, overrides, "")
            schema.validate(setting_config)
            scope.check(setting_config)
        except schema.ConfigError as err:
            raise schema.ConfigError(f"{what} {name!r}: {err}") from None
        setting_config.lock()
        resolved.append(Setting(name=name, config=setting_config))
    return resolved


def _order(setting: Setting) -> tuple:
    """Report order: non-private before private, centralized before federated, then by the
    epsilon asked for (``report.settings`` itself is unordered)."""
    c = setting.config
    target = c.privacy.target_epsilon if setting.private else 0.0
    return (setting.private, setting.federated, len(setting.defences), -target, setting.name)
