"""The typed records between the trainers and their users (``cli``, ``reporting``).

A :class:`Trainer` is one entry of :mod:`fedjax_med.trainers.registry`; a :class:`Run` is a
trained run restored from its workdir: what the attacks and the privacy report need, with no
``Any`` and no ``hasattr`` at the seam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import partition, preprocess
from fedjax_med.models import registry as model_registry

Params = Any


@dataclasses.dataclass(frozen=True)
class Run:
    """A run restored from its workdir.

    Attributes:
      trainer: the name of the trainer that ran it (``config.trainer``).
      config: its resolved config.
      splits: its data splits, normaliser and model, rebuilt from the config.
      normalizer: the per-site (or fixed) normaliser of the training split.
      model: the model's pure ``init`` / ``apply``.
      params: the parameters of its latest checkpoint.
      initial_params: the parameters it started from (the model of a first round).
      step: steps (central) or rounds (federated) of the latest checkpoint.
      federation: the clients of a federated run; ``None`` for a centralized one.
    """

    trainer: str
    config: ml_collections.ConfigDict
    splits: dataset_lib.DatasetSplits
    normalizer: preprocess.Normalizer
    model: model_registry.Model
    params: Params
    initial_params: Params
    step: int
    federation: partition.FederatedDataset | None = None

    @property
    def is_federated(self) -> bool:
        """Whether the run is federated (it has a ``federation``)."""
        return self.federation is not None


@dataclasses.dataclass(frozen=True)
class Trainer:
    """One trainer: ``train(config, workdir, resume=, quiet=, stop_at=) -> report`` and
    ``restore(workdir) -> Run``.

    ``stop_at`` ends the run after checkpointing that step (round), as a preemption would;
    calling ``train`` again with ``resume=True`` finishes it.
    """

    name: str
    train: Callable[..., dict[str, Any]]
    restore: Callable[[str], Run]
