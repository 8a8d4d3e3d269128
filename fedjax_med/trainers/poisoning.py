"""The threat model of a federated run: who is malicious, what they do, how the server aggregates.

Built once per run from ``config.poisoning`` and ``config.robust_aggregation``:

* the malicious clients, ``poisoning.fraction`` of the federation, drawn from the
  :data:`fedjax_med.randomness.POISONING` stream of ``config.seed`` (the study's scenario, not a
  privacy draw, like the partition);
* their data (:class:`fedjax_med.attacks.poisoning.DataPoisoning`) and the updates they submit
  (:func:`fedjax_med.attacks.poisoning.make_tamper`), handed to the round as
  :attr:`~fedjax_med.federated.algorithms.RoundOptions.tamper`;
* the server rule (:func:`fedjax_med.federated.robust_aggregation.make_aggregator`), checked
  against its breakdown point for the planned cohort;
* the attack's test sets, on which :meth:`Threat.evaluate` measures the attack success rate at
  every evaluation, next to the clean accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from fedjax_med import randomness
from fedjax_med.attacks import poisoning
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import partition
from fedjax_med.federated import robust_aggregation
from fedjax_med.training import evaluate
from fedjax_med.training import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Threat:
    """A run's malicious clients and server rule (no attack and the mean: :attr:`active` False).

    Attributes:
      kind: ``poisoning.kind``.
      malicious: ``(K,)`` bool, the malicious clients.
      client_names: the federation's client names.
      federation: the federation as its clients hold it (malicious data poisoned).
      tamper: the round's tamper hook (``None``: every client submits its honest update).
      aggregator: the server rule.
      boost: the ``gamma`` the attack uses.
      z: ``little_is_enough``'s ``z``.
      attack_sets: split -> the test images the attack wants misread (targeted kinds only).
    """

    kind: str
    malicious: np.ndarray
    client_names: tuple[str, ...]
    federation: partition.FederatedDataset
    tamper: poisoning.Tamper | None
    aggregator: robust_aggregation.Aggregator
    boost: float
    z: float
    attack_sets: dict[str, dataset_lib.ImageDataset]

    @property
    def active(self) -> bool:
        return self.kind != "none" or self.aggregator.name != "mean"

    def evaluate(self, predict_fn, params, normalizer, batch_size, split) -> dict[str, float]:
        """``{"<split>_attack_success": rate}`` for a targeted attack, else ``{}``."""
        data = self.attack_sets.get(split)
        if data is None:
            return {}
        probs, _ = evaluate.predict_dataset(predict_fn, params, data, normalizer, batch_size)
        return {f"{split}_attack_success": poisoning.attack_success_rate(probs, data.labels)}

    def report(self, metrics_path: str) -> dict[str, Any]:
        """``{"poisoning": ...}`` for report.json (``{}`` when no attack and the plain mean).

        Per round: the validation accuracy and attack success of every evaluation in
        ``metrics.jsonl``; at the end, the test split's.
        """
        if not self.active:
            return {}
        records = workdir_lib.read_metrics(metrics_path)
        history = [
            {
                "round": r["step"],
                "val_accuracy": r.get("val_accuracy"),
                "val_attack_success": r.get("val_attack_success"),
            }
            for r in records
            if r.get("split") == "val"
        ]
        test = ([r for r in records if r.get("split") == "test"] or [{}])[-1]
        names = [n for n, bad in zip(self.client_names, self.malicious, strict=True) if bad]
        return {
            "poisoning": {
                "attack": self.kind,
                "malicious_clients": names,
                "boost": self.boost if self.kind in ("backdoor", "scale", "sign_flip") else None,
                "z": self.z if self.kind == "little_is_enough" else None,
                "aggregator": self.aggregator.name,
                "num_byzantine": self.aggregator.num_byzantine,
                "test_accuracy": test.get("test_accuracy"),
                "test_attack_success": test.get("test_attack_success"),
                "per_round": history,
            }
        }


def aggregator(config: ml_collections.ConfigDict, cohort: int) -> robust_aggregation.Aggregator:
    r = config.robust_aggregation
    try:
        robust_aggregation.check_breakdown(r.method, cohort, r.num_byzantine, r.num_selected)
    except ValueError as err:
        raise ValueError(
            f"config field 'robust_aggregation.num_byzantine'={r.num_byzantine} with "
            f"robust_aggregation.method={r.method!r} and {cohort} clients per round "
            f"(federated.clients_per_round, 0 = all): {err}"
        ) from None
    return robust_aggregation.make_aggregator(
        r.method,
        num_byzantine=r.num_byzantine,
        num_selected=r.num_selected,
        norm_bound=r.norm_bound,
        noise_std=r.noise_std,
    )


def build(
    config: ml_collections.ConfigDict,
    splits: dataset_lib.DatasetSplits,
    federation: partition.FederatedDataset,
    *,
    cohort: int,
    server_lr: float,
) -> Threat:
    """The :class:`Threat` of ``config`` for ``federation`` (``cohort`` clients per round)."""
    p = config.poisoning
    rng = randomness.Randomness("reproducible", config.seed).generator(randomness.POISONING)
    malicious = poisoning.choose_malicious(federation.num_clients, p.fraction, rng)
    info = splits.info
    if p.kind in poisoning.TARGETED and info.task not in ("multiclass", "binary"):
        raise ValueError(
            f"config field 'poisoning.kind'={p.kind!r} needs a single-label task, not {info.task}"
        )
    try:
        data = poisoning.DataPoisoning(
            p.kind,
            info.num_classes,
            target_label=p.target_label,
            trigger_size=p.trigger_size,
            poison_fraction=p.poison_fraction,
        )
        poisoned = data.poison_federation(federation, malicious, rng)
    except ValueError as err:
        raise ValueError(f"config section 'poisoning': {err}") from None
    boost = float(p.boost) or (1.0 if p.kind == "sign_flip" else cohort / server_lr)
    z = float(p.z)
    if p.kind == "little_is_enough" and z == 0:
        expected = max(1, round(cohort * malicious.sum() / federation.num_clients))
        try:
            z = poisoning.little_is_enough_z(cohort, expected)
        except ValueError as err:
            raise ValueError(f"config field 'poisoning.fraction'={p.fraction}: {err}") from None
    tamper = None
    if p.kind not in ("none", "label_flip"):
        tamper = poisoning.make_tamper(p.kind, malicious, boost=boost, z=z)
    attack_sets = {}
    for split in ("val", "test"):
        attack_set = data.attack_test_set(splits.split(split))
        if attack_set is not None and len(attack_set):
            attack_sets[split] = attack_set
    return Threat(
        kind=p.kind,
        malicious=malicious,
        client_names=tuple(federation.client_names),
        federation=poisoned,
        tamper=tamper,
        aggregator=aggregator(config, cohort),
        boost=boost,
        z=z,
        attack_sets=attack_sets,
    )
