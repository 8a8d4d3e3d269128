"""Poisoning by malicious clients of a federation: their data, or the updates they submit.

A fixed set of clients is malicious for the whole run (compromised hospitals), drawn once from
the :data:`fedjax_med.randomness.POISONING` stream. What they do:

* ``label_flip`` (data poisoning; the label-flipping attack of Tolpegin, Truex, Gursoy, Liu,
  ESORICS 2020, https://arxiv.org/abs/2007.08432, with every class flipped): each malicious
  client trains honestly on its own images with labels ``y -> K - 1 - y``.
* ``backdoor`` (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How to backdoor federated learning",
  AISTATS 2020, https://arxiv.org/abs/1807.00459): a ``poison_fraction`` of each malicious
  client's images carry a pixel-pattern trigger (:func:`stamp_trigger`) and the target label;
  it trains on that mix, so the model keeps its main-task accuracy, and submits its update
  boosted by ``gamma`` (model replacement: ``gamma (X - G)`` with ``gamma = n / eta``, ``n``
  the clients per round and ``eta`` the server learning rate, replaces the global model ``G``
  by the backdoored ``X`` when the others' updates roughly cancel).
* ``scale`` and ``sign_flip`` (model poisoning): the honest update times ``gamma`` or ``-gamma``.
* ``little_is_enough`` (Baruch, Baruch, Goldberg, NeurIPS 2019, https://arxiv.org/abs/1902.06156,
  Algorithm 3): every malicious client submits ``mu_j - z sigma_j`` per coordinate, with
  ``mu, sigma`` the mean and standard deviation of the cohort's honest updates and ``z`` from
  :func:`little_is_enough_z`; updates are descent directions (``-lr`` times gradients), so this
  is the paper's ``mu + z sigma`` on gradients. It stays within the benign spread that median,
  trimmed mean and Krum accept. The attackers see the honest updates' statistics (the paper's
  omniscient setting, the strongest one).

Attack success (:func:`attack_success_rate`) is the fraction of a triggered test set classified
as the attacker wants: for the backdoor, the non-target test images with the trigger, read as
the target; for label flipping, every test image whose flipped label differs, read as flipped.
Everything here is a pure function (host NumPy for the data, jittable JAX for the updates).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import partition

Params = Any

KINDS = ("none", "label_flip", "backdoor", "scale", "sign_flip", "little_is_enough")
DATA_KINDS = ("label_flip", "backdoor")  # attacks that change the malicious clients' data
TARGETED = ("label_flip", "backdoor")  # attacks with an attack success rate


def choose_malicious(num_clients: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``(K,)`` bool: ``max(1, round(fraction K))`` malicious clients (none for ``fraction=0``).

    Examples:
      >>> choose_malicious(6, 1 / 6, np.random.default_rng(0)).sum()
      np.int64(1)
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"{fraction=} must lie in [0, 1)")
    count = 0 if fraction == 0 else max(1, round(fraction * num_clients))
    chosen = np.zeros(num_clients, bool)
    chosen[rng.choice(num_clients, size=count, replace=False)] = True
    return chosen


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``y -> K - 1 - y``.

    Examples:
      >>> flip_labels(np.array([0, 1, 3]), 4).tolist()
      [3, 2, 0]
    """
    return (num_classes - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)


def stamp_trigger(images: np.ndarray, size: int) -> np.ndarray:
    """Images with a ``size x size`` checkerboard in the bottom-right corner (all channels).

    The pattern alternates the brightest and darkest pixel values (255 and 0 for uint8, 1 and 0
    for images scaled to ``[0, 1]``): a pixel pattern in the sense of Bagdasaryan et al. 2020.

    Examples:
      >>> stamp_trigger(np.full((1, 4, 4, 1), 7, np.uint8), 2)[0, 2:, 2:, 0].tolist()
      [[255, 0], [0, 255]]
    """
    images = np.array(images, copy=True)
    spatial = images.shape[1:-1]  # (H, W), or (D, H, W) for volumes: a size^3 corner cube
    if not 1 <= size <= min(spatial):
        raise ValueError(f"trigger {size=} must lie in [1, {min(spatial)}]")
    bright = 255 if images.dtype == np.uint8 else 1.0
    grids = np.meshgrid(*(np.arange(size),) * len(spatial), indexing="ij")
    pattern = np.where(sum(grids) % 2 == 0, bright, 0).astype(images.dtype)
    corner = (slice(None),) + tuple(slice(n - size, n) for n in spatial) + (slice(None),)
    images[corner] = pattern[None, ..., None]
    return images


@dataclasses.dataclass(frozen=True)
class DataPoisoning:
    """What the malicious clients do to their own images and labels.

    Attributes:
      kind: ``"label_flip"`` or ``"backdoor"`` (others leave data alone).
      num_classes: ``K``.
      target_label: the backdoor's target class.
      trigger_size: side of the backdoor's pixel pattern.
      poison_fraction: fraction of each malicious client's images the backdoor poisons.
    """

    kind: str
    num_classes: int
    target_label: int = 0
    trigger_size: int = 3
    poison_fraction: float = 0.5

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {KINDS}")
        if not 0 <= self.target_label < self.num_classes:
            raise ValueError(
                f"target_label={self.target_label} must lie in [0, {self.num_classes})"
            )
        if not 0 < self.poison_fraction <= 1:
            raise ValueError(f"poison_fraction={self.poison_fraction} must lie in (0, 1]")

    def poison_federation(
        self,
        federation: partition.FederatedDataset,
        malicious: np.ndarray,
        rng: np.random.Generator,
    ) -> partition.FederatedDataset:
        """The federation as the malicious clients hold it (honest clients unchanged)."""
        if self.kind not in DATA_KINDS or not malicious.any():
            return federation
        real = np.asarray(federation.mask) & np.asarray(malicious)[:, None]
        if self.kind == "backdoor":
            # Each malicious client poisons floor(fraction * count) of its rows, at random.
            u = np.where(real, rng.random(real.shape), np.inf)
            ranks = np.argsort(np.argsort(u, axis=1), axis=1)
            quota = np.floor(self.poison_fraction * np.asarray(federation.counts)).astype(int)
            real = real & (ranks < quota[:, None])
        rows = np.asarray(federation.example_index)[real]
        central = federation.centralized
        images, labels = np.array(central.images, copy=True), np.array(central.labels, copy=True)
        if self.kind == "label_flip":
            labels[rows] = flip_labels(labels[rows], self.num_classes)
        else:
            images[rows] = stamp_trigger(images[rows], self.trigger_size)
            labels[rows] = self.target_label
        central = dataclasses.replace(central, images=images, labels=labels)
        index = np.asarray(federation.example_index)
        safe = np.where(index >= 0, index, 0)
        keep = np.asarray(federation.mask).reshape(index.shape + (1,) * (images.ndim - 1))
        return dataclasses.replace(
            federation,
            centralized=central,
            images=np.where(keep, images[safe], 0).astype(federation.images.dtype),
            labels=np.where(np.asarray(federation.mask), labels[safe], 0).astype(
                federation.labels.dtype
            ),
        )

    def attack_test_set(self, data: dataset_lib.ImageDataset) -> dataset_lib.ImageDataset | None:
        """The test images the attack wants misread, labelled as the attacker wants them read.

        Backdoor: non-target images with the trigger, labelled ``target_label``. Label flip:
        images whose flipped label differs, labelled flipped. ``None`` for untargeted attacks.
        """
        labels = np.asarray(data.labels)
        if self.kind == "backdoor":
            chosen = data.take(np.flatnonzero(labels != self.target_label))
            return dataclasses.replace(
                chosen,
                images=stamp_trigger(chosen.images, self.trigger_size),
                labels=np.full_like(chosen.labels, self.target_label),
            )
        if self.kind == "label_flip":
            flipped = flip_labels(labels, self.num_classes)
            chosen = data.take(np.flatnonzero(flipped != labels))
            return dataclasses.replace(chosen, labels=flip_labels(chosen.labels, self.num_classes))
        return None


def attack_success_rate(probabilities: np.ndarray, wanted: np.ndarray) -> float:
    """Fraction of examples whose predicted class is the attacker's ``wanted`` label.

    ``probabilities`` are ``(N, K)`` class probabilities, or ``(N,)`` / ``(N, 1)`` of class 1 for
    a binary head.

    Examples:
      >>> attack_success_rate(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([1, 1]))
      0.5
    """
    p = np.asarray(probabilities)
    if p.ndim == 1 or p.shape[-1] == 1:
        predicted = (p.reshape(len(p)) > 0.5).astype(np.int64)
    else:
        predicted = p.argmax(-1)
    if len(predicted) == 0:
        return float("nan")
    return float(np.mean(predicted == np.asarray(wanted).reshape(len(predicted))))


def little_is_enough_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al. 2019's ``z_max``: ``s = floor(n/2 + 1) - m``, ``Phi(z) = (n - s) / n``.

    ``s`` is the number of honest clients the attackers need to sway to reach a majority.

    Examples:
      >>> round(little_is_enough_z(50, 12), 4)  # the paper's n = 50, m = 24% of it
      0.5828
    """
    n, m = num_clients, num_malicious
    s = (n // 2 + 1) - m
    if not 1 <= m < n or s < 1:
        raise ValueError(
            f"little_is_enough needs 1 <= m < n and a malicious minority (s = floor(n/2 + 1) "
            f"- m >= 1): n={n}, m={m}"
        )
    return float(statistics.NormalDist().inv_cdf((n - s) / n))


def _select(malicious: jax.Array, bad: Params, good: Params) -> Params:
    def leaf(b, g):
        return jnp.where(malicious.reshape(malicious.shape + (1,) * (g.ndim - 1)), b, g)

    return jax.tree.map(leaf, bad, good)


def scale_updates(deltas: Params, malicious: jax.Array, factor: float) -> Params:
    """Malicious rows times ``factor`` (model replacement, scaling, sign flipping)."""
    return _select(malicious, jax.tree.map(lambda d: d * factor, deltas), deltas)


def little_is_enough(deltas: Params, malicious: jax.Array, honest: jax.Array, z: float) -> Params:
    """Malicious rows replaced by ``mu - z sigma`` of the honest rows, per coordinate.

    Examples:
      >>> d = jnp.array([[1.0], [3.0], [0.0]])
      >>> little_is_enough(d, jnp.array([False, False, True]), jnp.array([True, True, False]),
      ...                  1.0).tolist()
      [[1.0], [3.0], [1.0]]
    """
    honest = jnp.asarray(honest, bool)
    count = jnp.maximum(jnp.sum(honest), 1)

    def shifted(d):
        h = honest.reshape(honest.shape + (1,) * (d.ndim - 1))
        mu = jnp.sum(jnp.where(h, d, 0.0), axis=0) / count
        var = jnp.sum(jnp.where(h, jnp.square(d - mu), 0.0), axis=0) / count
        return jnp.broadcast_to(mu - z * jnp.sqrt(var), d.shape)

    return _select(malicious, jax.tree.map(shifted, deltas), deltas)


# tamper(indices, reporting, deltas) -> deltas: what the cohort submits after local training.
Tamper = Callable[[jax.Array, jax.Array, Params], Params]


def make_tamper(kind: str, malicious_clients: np.ndarray, *, boost: float, z: float) -> Tamper:
    """The model-poisoning step of ``kind`` for a federation whose ``malicious_clients`` are set.

    Args:
      kind: one of :data:`KINDS`; ``none`` and ``label_flip`` submit honest updates.
      malicious_clients: ``(K,)`` bool over all clients.
      boost: ``gamma`` of ``backdoor`` / ``scale`` / ``sign_flip``.
      z: ``little_is_enough``'s ``z``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {KINDS}")
    table = jnp.asarray(malicious_clients, bool)
    factor = {"backdoor": boost, "scale": boost, "sign_flip": -boost}.get(kind)

    def tamper(indices, reporting, deltas):
        malicious = table[indices] & reporting
        if kind == "little_is_enough":
            return little_is_enough(deltas, malicious, reporting & ~malicious, z)
        if factor is None:
            return deltas
        return scale_updates(deltas, malicious, factor)

    return tamper
