"""Byzantine-robust aggregators of a cohort's stacked updates, each with its breakdown point.

Every aggregator takes stacked updates (a pytree whose leaves have a leading client axis ``C``)
and a ``(C,)`` mask of the clients that take part (``n = sum(mask)``); the others, padding and
excluded clients, never affect the result, whatever their update holds. All are pure and
jittable: sorting, pairwise distances and a fixed-length ``fori_loop``, no Python loop over
clients. ``f`` is the number of Byzantine (arbitrary) clients an aggregator is built to tolerate.

* Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018,
  https://arxiv.org/abs/1803.01498): per coordinate the median of the ``n`` values
  (the mean of the two middle ones for even ``n``). Breakdown: ``n > 2f``.
* Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop the ``f`` largest and ``f``
  smallest values and average the other ``n - 2f``. Breakdown: ``n > 2f``.
* Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017,
  https://arxiv.org/abs/1703.02757): the score of update ``i`` is the sum of squared distances
  to its ``n - f - 2`` nearest other updates; Krum returns the update of lowest score,
  Multi-Krum the mean of the ``m`` lowest-scored. Breakdown: ``n > 2f + 2`` (and ``m <= n - f``).
* Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018, https://arxiv.org/abs/1802.07927): Krum
  applied recursively selects ``theta = n - 2f`` updates (each pick removed from the set); then
  per coordinate the mean of the ``beta = theta - 2f`` selected values closest to their median.
  Breakdown: ``n >= 4f + 3``.
* Norm bounding with weak DP (Sun, Kairouz, Suresh, McMahan 2019, "Can you really backdoor
  federated learning?", https://arxiv.org/abs/1911.07963): every update clipped to L2 norm
  ``M`` (:func:`fedjax_med.federated.aggregation.clip_updates`), the weighted mean, plus
  ``N(0, sigma^2)`` per coordinate. No breakdown point: it bounds each client's influence to
  ``w_k M / sum w`` instead. The noise is a defence, not a differential-privacy claim (nothing
  calibrates it to a sensitivity).

A round whose ``n`` falls below the breakdown bound (dropouts, exclusions) still aggregates, and
:func:`below_breakdown` says so; :func:`check_breakdown` refuses a planned cohort below it.
None of these can run under secure aggregation: they need every individual update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_med.federated import aggregation
from fedjax_med.privacy import noise

Params = Any

METHODS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bound")


def ravel_clients(updates: Params) -> tuple[jax.Array, Callable[[jax.Array], Params]]:
    """Stacked per-client pytrees -> ``(C, d)`` rows and the unravel of one row."""
    flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates)
    _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], updates))
    return flat, unravel


def _count(mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.asarray(mask, bool)).astype(jnp.int32)


def _sorted(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` sorted along the client axis with absent clients as ``+inf`` (they sort last)."""
    m = jnp.asarray(mask, bool).reshape(mask.shape + (1,) * (x.ndim - 1))
    return jnp.sort(jnp.where(m, x, jnp.inf), axis=0)


def _ranked_mean(s: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Mean over ranks ``[lo, hi)`` of the sorted ``s``; values outside are selected away."""
    ranks = jnp.arange(s.shape[0]).reshape((-1,) + (1,) * (s.ndim - 1))
    inside = (ranks >= lo) & (ranks < hi)
    total = jnp.sum(jnp.where(inside, s, 0.0), axis=0)
    count = jnp.maximum(hi - lo, 1)
    return jnp.where(hi > lo, total / count, 0.0)


def coordinate_median(updates: Params, mask: jax.Array) -> Params:
    """Coordinate-wise median of the masked updates (Yin et al. 2018); zeros when ``n = 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> u = jnp.array([[1.0], [2.0], [1e30], [7.0]])
      >>> coordinate_median(u, jnp.array([True, True, True, False])).tolist()
      [2.0]
    """
    n = _count(mask)

    def leaf(x):
        s = _sorted(x, mask)
        # The two middle ranks (equal for odd n): a mean over ranks [(n-1)//2, n//2 + 1).
        return jnp.where(n > 0, _ranked_mean(s, (n - 1) // 2, n // 2 + 1), 0.0)

    return jax.tree.map(leaf, updates)


def trimmed_mean(updates: Params, mask: jax.Array, trim: int) -> Params:
    """Coordinate-wise ``trim``-trimmed mean (Yin et al. 2018): drop ``trim`` values per side.

    Examples:
      >>> import jax.numpy as jnp
      >>> u = jnp.array([[-1e30], [1.0], [2.0], [3.0], [1e30]])
      >>> trimmed_mean(u, jnp.ones(5, bool), 1).tolist()
      [2.0]
    """
    n = _count(mask)
    return jax.tree.map(lambda x: _ranked_mean(_sorted(x, mask), trim, n - trim), updates)


def pairwise_sq_distances(flat: jax.Array) -> jax.Array:
    """``(C, C)`` squared L2 distances between rows; NaN (from infinite rows) reads as ``inf``."""
    d = jax.vmap(lambda row: jnp.sum(jnp.square(flat - row), axis=1))(flat)
    return jnp.where(jnp.isnan(d), jnp.inf, d)


def krum_scores(distances: jax.Array, mask: jax.Array, num_byzantine: int) -> jax.Array:
    """Blanchard et al.'s score: sum of the ``n - f - 2`` smallest distances to other updates.

    Absent clients score ``+inf``; with ``n - f - 2 <= 0`` every present client scores 0.
    """
    mask = jnp.asarray(mask, bool)
    c = mask.shape[0]
    others = mask[:, None] & mask[None, :] & ~jnp.eye(c, dtype=bool)
    nearest = jnp.sort(jnp.where(others, distances, jnp.inf), axis=1)
    k = jnp.maximum(_count(mask) - num_byzantine - 2, 0)
    score = jnp.sum(jnp.where(jnp.arange(c)[None, :] < k, nearest, 0.0), axis=1)
    return jnp.where(mask, score, jnp.inf)


def multi_krum_selection(
    updates: Params, mask: jax.Array, num_byzantine: int, num_selected: int
) -> jax.Array:
    """``(C,)`` bool: the ``m`` present clients of lowest Krum score (``m = 0``: ``n - f``)."""
    flat, _ = ravel_clients(updates)
    scores = krum_scores(pairwise_sq_distances(flat), mask, num_byzantine)
    m = num_selected if num_selected > 0 else _count(mask) - num_byzantine
    rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    return jnp.asarray(mask, bool) & (rank < m)


def multi_krum(updates: Params, mask: jax.Array, num_byzantine: int, num_selected: int) -> Params:
    """Multi-Krum (Blanchard et al. 2017): the mean of the ``m`` lowest-scored updates.

    ``num_selected = 1`` is Krum; ``0`` selects ``n - f``. E.g. updates 0, 1, 2, 1.5 and 100
    with ``f = 1`` (``n - f - 2 = 2`` neighbours) score 3.25, 1.25, 1.25, 0.5 and ~1e4: Krum
    returns 1.5.
    """
    selected = multi_krum_selection(updates, mask, num_byzantine, num_selected)
    return aggregation.uniform_mean(updates, selected)


def krum(updates: Params, mask: jax.Array, num_byzantine: int) -> Params:
    """Krum (Blanchard et al. 2017): the single update of lowest score."""
    return multi_krum(updates, mask, num_byzantine, 1)


def bulyan_selection(updates: Params, mask: jax.Array, num_byzantine: int) -> jax.Array:
    """``(C,)`` bool: the ``theta = n - 2f`` updates recursive Krum picks (El Mhamdi et al.)."""
    flat, _ = ravel_clients(updates)
    distances = pairwise_sq_distances(flat)
    mask = jnp.asarray(mask, bool)
    theta = _count(mask) - 2 * num_byzantine

    def pick(i, carry):
        remaining, selected = carry
        best = jnp.argmin(krum_scores(distances, remaining, num_byzantine))
        take = (i < theta) & remaining[best]
        return remaining.at[best].set(remaining[best] & ~take), selected.at[best].set(
            selected[best] | take
        )

    _, selected = jax.lax.fori_loop(0, mask.shape[0], pick, (mask, jnp.zeros_like(mask)))
    return selected


def bulyan(updates: Params, mask: jax.Array, num_byzantine: int) -> Params:
    """Bulyan (El Mhamdi et al. 2018): recursive Krum, then a coordinate-wise trimmed step.

    Of the ``theta`` selected updates, each coordinate averages the ``beta = theta - 2f`` values
    closest to the selected values' coordinate-wise median.
    """
    selected = bulyan_selection(updates, mask, num_byzantine)
    beta = _count(selected) - 2 * num_byzantine
    medians = coordinate_median(updates, selected)

    def leaf(x, med):
        m = selected.reshape(selected.shape + (1,) * (x.ndim - 1))
        distance = jnp.where(m, jnp.abs(x - med[None]), jnp.inf)
        order = jnp.argsort(distance, axis=0, stable=True)
        closest = jnp.take_along_axis(jnp.where(m, x, 0.0), order, axis=0)
        return _ranked_mean(closest, 0, beta)

    return jax.tree.map(leaf, updates, medians)


def norm_bounded_mean(
    updates: Params,
    weights: jax.Array,
    bound: float,
    noise_std: float = 0.0,
    key: jax.Array | None = None,
) -> Params:
    """Sun et al. 2019: ``sum_k w_k clip_M(u_k) / sum_k w_k + N(0, sigma^2 I)``.

    Args:
      updates: stacked updates.
      weights: ``(C,)`` non-negative weights; 0 = absent.
      bound: ``M``, the L2 norm every update is clipped to.
      noise_std: ``sigma``, the weak-DP noise per coordinate (0 = none).
      key: PRNG key of the noise (needed when ``noise_std > 0``).
    """
    mean = aggregation.weighted_mean(aggregation.clip_updates(updates, bound), weights)
    if noise_std == 0:
        return mean
    return noise.add_gaussian_noise(mean, key, noise_std)


def minimum_clients(method: str, num_byzantine: int) -> int:
    """The smallest ``n`` at which ``method`` tolerates ``num_byzantine`` arbitrary updates."""
    f = num_byzantine
    return {
        "mean": 1 if f == 0 else 2**31 - 1,  # one arbitrary update moves the mean anywhere
        "median": 2 * f + 1,
        "trimmed_mean": 2 * f + 1,
        "krum": 2 * f + 3,
        "multi_krum": 2 * f + 3,
        "bulyan": 4 * f + 3,
        "norm_bound": 1,
    }[method]


def check_breakdown(method: str, num_clients: int, num_byzantine: int, num_selected: int = 0):
    """Refuses a planned cohort of ``num_clients`` below ``method``'s breakdown point.

    Raises:
      ValueError: naming the method, the bound and both numbers.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine={num_byzantine} must be >= 0")
    if method == "mean":
        return
    bounds = {
        "median": "n > 2f",
        "trimmed_mean": "n > 2f",
        "krum": "n > 2f + 2",
        "multi_krum": "n > 2f + 2",
        "bulyan": "n >= 4f + 3",
        "norm_bound": "n >= 1",
    }
    if num_clients < minimum_clients(method, num_byzantine):
        raise ValueError(
            f"{method} tolerates f={num_byzantine} Byzantine clients only with {bounds[method]} "
            f"(El Mhamdi et al. 2018; Blanchard et al. 2017; Yin et al. 2018): "
            f"num_clients={num_clients} per round is too few"
        )
    if method == "multi_krum" and not 0 <= num_selected <= num_clients - num_byzantine:
        raise ValueError(
            f"multi_krum num_selected={num_selected} must lie in [0, n - f] = "
            f"[0, {num_clients - num_byzantine}] (0: n - f)"
        )


def below_breakdown(method: str, mask: jax.Array, num_byzantine: int) -> jax.Array:
    """Whether this round's ``n = sum(mask)`` is below ``method``'s breakdown point (bool)."""
    if method == "mean":
        return jnp.asarray(num_byzantine > 0)
    return _count(mask) < minimum_clients(method, num_byzantine)


# aggregate(updates, weights, key) -> the update the server applies.
Aggregate = Callable[[Params, jax.Array, jax.Array], Params]


@dataclasses.dataclass(frozen=True)
class Aggregator:
    """A server aggregation rule: ``aggregate(updates, weights, key)`` and what it tolerates.

    Attributes:
      name: one of :data:`METHODS`.
      aggregate: the rule; clients with weight 0 are absent. Robust rules use the weights only
        as a mask (their papers weight clients equally); the mean and norm bounding weight by
        them.
      num_byzantine: ``f``.
    """

    name: str
    aggregate: Aggregate
    num_byzantine: int = 0

    def below_breakdown(self, weights: jax.Array) -> jax.Array:
        return below_breakdown(self.name, weights > 0, self.num_byzantine)


MEAN = Aggregator("mean", lambda updates, weights, key: aggregation.weighted_mean(updates, weights))


def make_aggregator(
    method: str,
    *,
    num_byzantine: int = 0,
    num_selected: int = 0,
    norm_bound: float = 1.0,
    noise_std: float = 0.0,
) -> Aggregator:
    """The :class:`Aggregator` named ``method`` (one of :data:`METHODS`); ``"mean"`` is
    :data:`MEAN` itself (which keeps secure aggregation possible)."""
    f = num_byzantine
    if method == "mean":
        return MEAN
    if not norm_bound > 0:
        raise ValueError(f"{norm_bound=} must be > 0")
    if noise_std < 0:
        raise ValueError(f"{noise_std=} must be >= 0")
    rules: dict[str, Aggregate] = {
        "median": lambda u, w, key: coordinate_median(u, w > 0),
        "trimmed_mean": lambda u, w, key: trimmed_mean(u, w > 0, f),
        "krum": lambda u, w, key: krum(u, w > 0, f),
        "multi_krum": lambda u, w, key: multi_krum(u, w > 0, f, num_selected),
        "bulyan": lambda u, w, key: bulyan(u, w > 0, f),
        "norm_bound": lambda u, w, key: norm_bounded_mean(u, w, norm_bound, noise_std, key),
    }
    if method not in rules:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    return Aggregator(method, rules[method], f)
