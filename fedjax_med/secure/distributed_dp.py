"""Distributed DP for secure aggregation: integer noise added by each client (host NumPy).

With secure aggregation the server sees only the modular sum of the clients' quantised updates,
so no single client's update is ever in the clear. Each of ``n`` clients adds *integer* noise to
its quantised update; the securely summed noise carries the central guarantee. Two noises:

* ``"discrete_gaussian"``: each client adds discrete Gaussian noise ``N_Z(0, sigma_c^2)``
  (Canonne, Kamath, Steinke, NeurIPS 2020, https://arxiv.org/abs/2004.00010) with
  ``sigma_c = z * Delta_2 / sqrt(n)``. A sum of discrete Gaussians is *not* a discrete Gaussian;
  Kairouz, Liu, Steinke (ICML 2021, https://arxiv.org/abs/2102.06387, Theorem 1) bound how far
  the sum is from one, which costs a small slack ``tau`` in epsilon (see
  :func:`distributed_epsilon`).
* ``"skellam"``: each client adds ``Poisson(mu_c) - Poisson(mu_c)`` (variance ``2 mu_c``) with
  ``mu_c = (z * Delta_2)^2 / (2 n)``. Sums of Skellams are Skellam, so the total noise is
  ``Sk(mu, mu)`` with ``mu = n mu_c`` and variance ``(z * Delta_2)^2``; its Renyi DP is bounded
  by Agarwal, Kairouz, Liu (NeurIPS 2021, https://arxiv.org/abs/2110.04995, Theorem 3.5).

In both cases the total noise has variance ``(z * Delta_2)^2``, that of the central Gaussian
mechanism with noise multiplier ``z``, and both accountants tend to that mechanism as the noise
grows. ``Delta_2`` is the L2 sensitivity of the *quantised* (integer) update: see
:func:`quantised_l2_sensitivity`.

:class:`DistributedDP` fixes all of this for a run when it is built (clients per round,
dimension, clip, ``z``, ``delta``, kind, threshold, randomness) and draws each client's noise on
the client from a CSPRNG in secure mode.

Neighbouring relation (zero-out, ``dp_accounting.NeighboringRelation.REPLACE_SPECIAL``): one
client's quantised update is replaced by the zero vector (its noise is still added), i.e. the
integer sum changes by a vector ``v`` with ``||v||_2 <= Delta_2`` and
``||v||_1 <= Delta_1``. Modular wrap-around of the secure sum is not modelled here: choose the
modulus large enough that the noisy sum does not wrap (or treat wrap-around as post-processing
of a noisy sum that did not).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_med import randomness as randomness_lib
from fedjax_med.privacy import accounting
from fedjax_med.secure import field

KINDS = ("discrete_gaussian", "skellam")
ROUNDINGS = ("stochastic", "nearest")
# Theorem 3.5 of Agarwal et al. holds for integer orders alpha > 1.
SKELLAM_ORDERS = tuple(range(2, 257))
# Rejection sampling draws this many candidates per missing sample: the discrete Laplace step
# accepts with probability >= 1/2 and the Gaussian step with probability >= about 1/2.
_OVERSAMPLE = 4


def _check_nonnegative(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 <= value < math.inf):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 < value < math.inf):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{kind=} must be one of {KINDS}")


def _num_elements(size) -> int:
    return int(np.prod(size, dtype=np.int64)) if size is not None else 1


def sample_discrete_gaussian(
    sigma: float, size: int | tuple[int, ...] | None, rng: np.random.Generator
) -> np.ndarray:
    """Samples the discrete Gaussian ``P[x] ∝ exp(-x^2 / (2 sigma^2))`` on the integers.

    Algorithm 3 of Canonne, Kamath, Steinke (NeurIPS 2020, https://arxiv.org/abs/2004.00010):
    with ``t = floor(sigma) + 1``, draw ``Y`` from the discrete Laplace ``P[y] ∝ exp(-|y| / t)``
    and accept it with probability ``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``. The discrete
    Laplace is a sign times a geometric magnitude, rejecting "negative zero" (their Algorithm 2).
    Rejection runs in vectorised batches until ``size`` samples are accepted.

    Sharp edge: like the paper's practical variant, the geometric magnitudes (NumPy's sampler)
    and the acceptance probability use float64, not exact rational arithmetic, so the output
    pmf matches the target up to floating-point rounding of those probabilities (relative error
    about 1e-16 per probability), not exactly.

    Args:
      sigma: the scale ``sigma >= 0`` (the variance is below ``sigma^2`` for small ``sigma``:
        14% at 0.5, ``2e-7`` relative at 1, equal to float precision from 2); 0 gives zeros.
      size: output shape, as for NumPy samplers (``None`` gives one sample as a 0-d array).
      rng: the NumPy generator to draw from.

    Returns:
      An ``int64`` array of shape ``size``.

    Examples:
      >>> x = sample_discrete_gaussian(3.0, (2, 4), np.random.default_rng(0))
      >>> x.shape, x.dtype
      ((2, 4), dtype('int64'))
    """
    _check_nonnegative("sigma", sigma)
    total = _num_elements(size)
    shape = () if size is None else size
    if sigma == 0 or total == 0:
        return np.zeros(shape, np.int64)
    sigma = float(sigma)
    t = math.floor(sigma) + 1
    sigma_sq = sigma * sigma
    # Geometric success probability 1 - exp(-1/t), computed without cancellation.
    p_success = -math.expm1(-1.0 / t)
    out = np.empty(total, np.int64)
    filled = 0
    while filled < total:
        batch = _OVERSAMPLE * (total - filled) + 64
        magnitude = rng.geometric(p_success, batch).astype(np.int64) - 1
        negative = rng.integers(0, 2, batch, dtype=np.int8).astype(bool)
        laplace_ok = ~(negative & (magnitude == 0))
        accept_prob = np.exp(-np.square(magnitude - sigma_sq / t) / (2.0 * sigma_sq))
        accepted = laplace_ok & (rng.random(batch) < accept_prob)
        values = np.where(negative, -magnitude, magnitude)[accepted][: total - filled]
        out[filled : filled + values.size] = values
        filled += values.size
    return out.reshape(shape)


def sample_skellam(
    mu: float, size: int | tuple[int, ...] | None, rng: np.random.Generator
) -> np.ndarray:
    """Samples the symmetric Skellam ``Sk(mu, mu) = Poisson(mu) - Poisson(mu)``; variance ``2 mu``.

    Agarwal, Kairouz, Liu (NeurIPS 2021, https://arxiv.org/abs/2110.04995). Uses NumPy's Poisson
    sampler (floating point internally, like any library Poisson sampler).

    Args:
      mu: the Poisson rate ``mu >= 0``; 0 gives zeros.
      size: output shape, as for NumPy samplers.
      rng: the NumPy generator to draw from.

    Returns:
      An ``int64`` array of shape ``size``.

    Examples:
      >>> sample_skellam(10.0, 3, np.random.default_rng(0)).dtype
      dtype('int64')
    """
    _check_nonnegative("mu", mu)
    shape = () if size is None else size
    if mu == 0:
        return np.zeros(shape, np.int64)
    first = rng.poisson(float(mu), shape).astype(np.int64)
    return first - rng.poisson(float(mu), shape).astype(np.int64)


def quantised_l2_sensitivity(
    clip: float, scale: float, dim: int, rounding: str = "stochastic"
) -> float:
    """Upper bound on the L2 norm of one client's quantised update, ``Delta_2``.

    A client clips its update to L2 norm ``clip``, multiplies by ``scale`` and rounds each of
    the ``dim`` coordinates to an integer. Rounding moves each coordinate by less than 1
    (stochastic rounding to a neighbouring integer) or at most 1/2 (nearest), so by the
    triangle inequality ``Delta_2 <= scale * clip + sqrt(dim)`` or ``+ sqrt(dim) / 2``. This is
    the simple worst case; Kairouz, Liu, Steinke (https://arxiv.org/abs/2102.06387, Section 4)
    give a tighter high-probability bound for conditional randomised rounding, not used here.

    Args:
      clip: the L2 clip norm of the real-valued update, ``> 0``.
      scale: the quantisation scale (integers per unit), ``> 0``.
      dim: the number of coordinates, ``>= 1``.
      rounding: ``"stochastic"`` or ``"nearest"``.

    Returns:
      The bound ``Delta_2``.

    Examples:
      >>> quantised_l2_sensitivity(1.0, 100.0, 10_000)
      200.0
      >>> quantised_l2_sensitivity(1.0, 100.0, 10_000, rounding="nearest")
      150.0
    """
    _check_positive("clip", clip)
    _check_positive("scale", scale)
    _check_count("dim", dim, 1)
    if rounding not in ROUNDINGS:
        raise ValueError(f"{rounding=} must be one of {ROUNDINGS}")
    slack = math.sqrt(dim) if rounding == "stochastic" else math.sqrt(dim) / 2
    return float(scale * clip + slack)


def l1_sensitivity_bound(sensitivity_l2: float, dim: int) -> float:
    """Bounds the L1 norm of an *integer* vector in ``dim`` coordinates with L2 norm ``<= Delta_2``.

    ``||v||_1 <= sqrt(dim) ||v||_2`` (Cauchy-Schwarz) and, since ``|v_i| <= v_i^2`` for
    integers, ``||v||_1 <= ||v||_2^2``; the bound is the smaller of the two, as used by
    Agarwal et al. (https://arxiv.org/abs/2110.04995).

    Examples:
      >>> l1_sensitivity_bound(3.0, 4)
      6.0
      >>> l1_sensitivity_bound(1.0, 100)
      1.0
    """
    _check_positive("sensitivity_l2", sensitivity_l2)
    _check_count("dim", dim, 1)
    return float(min(math.sqrt(dim) * sensitivity_l2, sensitivity_l2**2))


def client_scale(kind: str, z: float, sensitivity: float, num_clients: int) -> float:
    """Each client's noise parameter for total noise variance ``(z * sensitivity)^2``.

    Returns ``sigma_c = z * Delta_2 / sqrt(n)`` for ``"discrete_gaussian"`` and the Poisson rate
    ``mu_c = (z * Delta_2)^2 / (2 n)`` for ``"skellam"``.

    Examples:
      >>> client_scale("discrete_gaussian", 1.0, 40.0, 16)
      10.0
      >>> client_scale("skellam", 1.0, 40.0, 16)
      50.0
    """
    _check_kind(kind)
    _check_positive("z", z)
    _check_positive("sensitivity", sensitivity)
    _check_count("num_clients", num_clients, 1)
    if kind == "discrete_gaussian":
        return float(z * sensitivity / math.sqrt(num_clients))
    return float((z * sensitivity) ** 2 / (2 * num_clients))


def client_noise(
    kind: str,
    z: float,
    sensitivity: float,
    num_clients: int,
    size: int | tuple[int, ...],
    rng: np.random.Generator,
) -> np.ndarray:
    """One client's integer noise, to add to its quantised update before secure aggregation.

    The sum over ``num_clients`` clients has per-coordinate variance ``(z * sensitivity)^2``
    (exactly for Skellam; for the discrete Gaussian each client's variance is within ``1e-6``
    relative of ``sigma_c^2`` once ``sigma_c >= 1``).

    Args:
      kind: ``"discrete_gaussian"`` or ``"skellam"``.
      z: the central noise multiplier, ``> 0``.
      sensitivity: ``Delta_2``, the L2 sensitivity of a quantised update.
      num_clients: ``n``, the number of clients whose noise is summed (the *minimum* number
        that will take part: fewer clients mean less total noise than accounted for).
      size: the shape of the update.
      rng: the NumPy generator to draw from (a secure source in deployment).

    Returns:
      An ``int64`` array of shape ``size``.

    Examples:
      >>> noise = client_noise("skellam", 1.0, 40.0, 16, (3, 2), np.random.default_rng(0))
      >>> noise.shape
      (3, 2)
    """
    scale = client_scale(kind, z, sensitivity, num_clients)
    if kind == "discrete_gaussian":
        return sample_discrete_gaussian(scale, size, rng)
    return sample_skellam(scale, size, rng)


def ddg_tau(sigma: float, num_clients: int) -> float:
    """The slack ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` of Kairouz et al.

    It measures how far a sum of ``n`` discrete Gaussians of scale ``sigma`` is from a discrete
    Gaussian (https://arxiv.org/abs/2102.06387, Theorem 1); it is 0 for one client and tiny
    once ``sigma`` is a few units (``tau < 1e-80`` at ``sigma = 10``).

    Examples:
      >>> ddg_tau(3.0, 1)
      0.0
      >>> 0 < ddg_tau(1.0, 10) < 1e-3
      True
    """
    _check_positive("sigma", sigma)
    _check_count("num_clients", num_clients, 1)
    k = np.arange(1, num_clients, dtype=np.float64)
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1))))


def distributed_rdp(
    kind: str,
    z: float,
    sensitivity_l2: float,
    sensitivity_l1: float,
    num_clients: int,
    orders,
    *,
    dim: int | None = None,
) -> np.ndarray:
    """Renyi DP of one round of the summed distributed noise, at each order in ``orders``.

    ``"discrete_gaussian"`` (Kairouz, Liu, Steinke, Theorem 1): with ``sigma = sigma_c >= 1/2``,
    the sum is ``eps^2 / 2``-concentrated DP, i.e. ``RDP(alpha) = alpha eps^2 / 2``, where
    ``eps = min(sqrt(Delta_2^2 / (n sigma^2) + tau d / 2), Delta_2 / (sqrt(n) sigma) + tau
    Delta_1)`` and ``Delta_2 / (sqrt(n) sigma) = 1 / z``. The first term is used only when
    ``dim = d`` is given.

    ``"skellam"`` (Agarwal, Kairouz, Liu, Theorem 3.5), total rate ``mu = n mu_c`` (variance
    ``2 mu``), integer ``alpha > 1``: ``RDP(alpha) = alpha Delta_2^2 / (4 mu) +
    min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (16 mu^2), 3 Delta_1 / (4 mu))``. (Written with
    the variance ``v = 2 mu`` this is ``alpha Delta_2^2 / (2 v) + min(((2 alpha - 1) Delta_2^2 +
    6 Delta_1) / (4 v^2), 3 Delta_1 / (2 v))``.) Non-integer orders give ``inf``.
    """
    _check_kind(kind)
    _check_positive("z", z)
    _check_positive("sensitivity_l2", sensitivity_l2)
    _check_positive("sensitivity_l1", sensitivity_l1)
    _check_count("num_clients", num_clients, 1)
    if dim is not None:
        _check_count("dim", dim, 1)
    alphas = np.asarray(orders, dtype=np.float64)
    if np.any(alphas <= 1):
        raise ValueError(f"{orders=} must all be > 1")
    if kind == "discrete_gaussian":
        sigma = client_scale(kind, z, sensitivity_l2, num_clients)
        if sigma < 0.5:
            raise ValueError(
                f"client sigma={sigma:.4g} (z * sensitivity_l2 / sqrt(num_clients)) must be "
                ">= 0.5 for the sum-of-discrete-Gaussians bound; raise the quantisation scale"
            )
        tau = ddg_tau(sigma, num_clients)
        eps = 1.0 / z + tau * sensitivity_l1
        if dim is not None:
            eps = min(eps, math.sqrt(1.0 / z**2 + tau * dim / 2))
        return alphas * eps**2 / 2
    mu = num_clients * client_scale(kind, z, sensitivity_l2, num_clients)
    l2_sq, l1 = sensitivity_l2**2, sensitivity_l1
    rdp = alphas * l2_sq / (4 * mu) + np.minimum(
        ((2 * alphas - 1) * l2_sq + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu)
    )
    return np.where(alphas == np.round(alphas), rdp, np.inf)


def distributed_epsilon(
    kind: str,
    z: float,
    sensitivity_l2: float,
    sensitivity_l1: float,
    num_clients: int,
    rounds: int,
    delta: float,
    *,
    dim: int | None = None,
) -> float:
    """Epsilon of ``rounds`` rounds of distributed noise summed by secure aggregation.

    Composes the per-round Renyi DP of :func:`distributed_rdp` over ``rounds`` rounds and
    converts to ``(epsilon, delta)`` with ``dp_accounting``'s RDP conversion, minimised over
    :data:`fedjax_med.privacy.accounting.RDP_ORDERS` (discrete Gaussian) or
    :data:`SKELLAM_ORDERS` (Skellam, integer orders).

    Guarantees: ``(epsilon, delta)``-DP of the sequence of noisy sums under replacing one
    client's quantised update by zero, when every round sums noise from at least
    ``num_clients`` clients and each update's quantised norms are at most ``sensitivity_l2``
    and ``sensitivity_l1``. No amplification by client sampling is claimed: with Poisson client
    sampling this is the full-participation bound (valid but loose) provided ``num_clients``
    is a lower bound on the clients taking part. The discrete Gaussian bound includes the
    paper's ``tau`` slack, so it is rigorous, not an approximation by the continuous Gaussian.

    Args:
      kind: ``"discrete_gaussian"`` or ``"skellam"``.
      z: the central noise multiplier (total noise stddev over ``sensitivity_l2``).
      sensitivity_l2: ``Delta_2`` of a quantised update (:func:`quantised_l2_sensitivity`).
      sensitivity_l1: ``Delta_1`` of a quantised update (:func:`l1_sensitivity_bound`).
      num_clients: ``n``, the number of clients adding noise each round.
      rounds: the number of rounds, ``>= 0``.
      delta: the target ``delta`` in ``(0, 1)``.
      dim: the number of coordinates; tightens the discrete Gaussian bound when given.

    Returns:
      The smallest epsilon over the orders searched.

    Examples:
      >>> round(distributed_epsilon("skellam", 2.0, 200.0, 2000.0, 16, 10, 1e-5), 2)
      8.09
      >>> round(distributed_epsilon("discrete_gaussian", 2.0, 200.0, 2000.0, 16, 10, 1e-5), 2)
      8.08
    """
    _check_count("rounds", rounds, 0)
    accounting.check_delta(delta)
    orders = accounting.RDP_ORDERS if kind == "discrete_gaussian" else SKELLAM_ORDERS
    rdp = distributed_rdp(kind, z, sensitivity_l2, sensitivity_l1, num_clients, orders, dim=dim)
    if rounds == 0:
        return 0.0
    eps, _ = rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, delta)
    return float(eps)


ZERO_OUT = "zero_out"
# dp_accounting's name for "one record replaced by a special (here: zero) value".
RELATION = dp_accounting.NeighboringRelation.REPLACE_SPECIAL


@dataclasses.dataclass(frozen=True)
class DistributedDP:
    """Distributed DP over secure aggregation, fixed when built: who adds what noise, and epsilon.

    Each client clips its update to L2 norm ``clip``, quantises it with the field scale
    (:meth:`encode`), adds integer noise drawn on the client (discrete Gaussian, Kairouz, Liu,
    Steinke, ICML 2021, https://arxiv.org/abs/2102.06387; or Skellam, Agarwal, Kairouz, Liu,
    NeurIPS 2021, https://arxiv.org/abs/2110.04995) and submits the ring vector to secure
    aggregation, so the server only ever decodes the noisy total (:meth:`decode`). The noise is
    calibrated so that the honest clients among any ``threshold`` survivors, at least
    :attr:`min_noisy_clients` ``= threshold - ceil(corrupted_fraction * num_clients)``, together
    carry noise multiplier ``noise_multiplier`` on the quantised sensitivity ``Delta_2``; the
    protocol never releases a sum of fewer than ``threshold`` clients, and more survivors only
    add noise.

    Guarantees: :meth:`epsilon` ``(releases)`` is the ``(epsilon, delta)`` of that many released
    sums under the *zero-out* relation (:attr:`relation`: one client's update replaced by 0, its
    noise still added; sensitivity ``Delta_2``), from :func:`distributed_epsilon`. A round that
    aborts releases nothing and is not counted. No amplification by sampling is claimed. The
    claim holds only in secure mode: in reproducible mode each client's noise is
    ``default_rng([seed, *CLIENT_NOISE, round, k])``, which anyone who knows the seed
    regenerates and subtracts (:attr:`claim`).

    Attributes:
      kind: ``"discrete_gaussian"`` or ``"skellam"``.
      num_clients: clients per round (the ring is sized so that this many never wrap).
      dim: coordinates of an update.
      clip: L2 clip norm ``S`` of an update.
      noise_multiplier: ``z``.
      delta: the ``delta`` of the claim.
      threshold: the secure-aggregation threshold t (fewest clients in a released sum), e.g.
        from :func:`fedjax_med.secure.secagg.secagg_plus_parameters`.
      randomness: where client noise comes from (a fresh CSPRNG per client in secure mode).
      corrupted_fraction: clients assumed to collude with the server (their noise is not
        counted).
      bits: ring size 2^bits.

    Examples:
      >>> from fedjax_med import randomness
      >>> ddp = DistributedDP("skellam", num_clients=8, dim=3, clip=1.0, noise_multiplier=1.0,
      ...                     delta=1e-5, threshold=5, randomness=randomness.Randomness("secure"))
      >>> ddp.relation_name, ddp.min_noisy_clients, ddp.epsilon(0)
      ('zero_out', 5, 0.0)
    """

    kind: str
    num_clients: int
    dim: int
    clip: float
    noise_multiplier: float
    delta: float
    threshold: int
    randomness: randomness_lib.Randomness
    corrupted_fraction: float = 0.0
    bits: int = 32
    encoder: field.FieldEncoder = dataclasses.field(init=False, repr=False)
    sensitivity_l2: float = dataclasses.field(init=False)
    sensitivity_l1: float = dataclasses.field(init=False)

    def __post_init__(self):
        _check_kind(self.kind)
        _check_count("num_clients", self.num_clients, 1)
        _check_count("dim", self.dim, 1)
        _check_positive("clip", self.clip)
        _check_positive("noise_multiplier", self.noise_multiplier)
        accounting.check_delta(self.delta)
        _check_count("threshold", self.threshold, 1)
        if self.threshold > self.num_clients:
            raise ValueError(f"threshold={self.threshold} must be <= {self.num_clients=}")
        if not 0 <= self.corrupted_fraction < 1:
            raise ValueError(f"corrupted_fraction={self.corrupted_fraction} must lie in [0, 1)")
        if self.min_noisy_clients < 1:
            raise ValueError(
                f"threshold={self.threshold} leaves no honest client when corrupted_fraction="
                f"{self.corrupted_fraction} of num_clients={self.num_clients} collude"
            )
        # Room in the ring for n clipped updates plus the summed noise (far beyond 8 sigma).
        enc = field.FieldEncoder(
            self.clip * (1 + 8 * self.noise_multiplier), self.num_clients, self.bits
        )
        l2 = quantised_l2_sensitivity(self.clip, enc.scale, self.dim, rounding="nearest")
        object.__setattr__(self, "encoder", enc)
        object.__setattr__(self, "sensitivity_l2", l2)
        object.__setattr__(self, "sensitivity_l1", l1_sensitivity_bound(l2, self.dim))

    @property
    def min_noisy_clients(self) -> int:
        """Fewest honest clients whose noise is in a released sum (the noise calibration's n)."""
        return self.threshold - math.ceil(self.corrupted_fraction * self.num_clients - 1e-9)

    @property
    def relation(self) -> dp_accounting.NeighboringRelation:
        """Zero-out: ``REPLACE_SPECIAL`` with the zero update as the special value."""
        return RELATION

    @property
    def relation_name(self) -> str:
        return ZERO_OUT

    @property
    def guarantee_holds(self) -> bool:
        """Whether client noise is secret (secure mode); False for a seeded simulation."""
        return self.randomness.secure

    @property
    def claim(self) -> str:
        """What :meth:`epsilon` means, in one sentence (for reports)."""
        what = (
            f"distributed {self.kind} noise (z={self.noise_multiplier:g}) over secure "
            f"aggregation; (epsilon, delta={self.delta:g})-DP of the released sums under zero-out "
            "neighbouring (one client's update replaced by 0), counting only rounds that "
            "released a sum"
        )
        if self.guarantee_holds:
            return what + "; client noise from an OS-keyed CSPRNG on each client"
        return (
            what + "; reproducible mode: client noise follows from the seed, so no guarantee "
            "holds against anyone who knows the seed"
        )

    def epsilon(self, releases: int) -> float:
        """Epsilon after ``releases`` released sums (an aborted round is not a release)."""
        return distributed_epsilon(
            self.kind,
            self.noise_multiplier,
            self.sensitivity_l2,
            self.sensitivity_l1,
            self.min_noisy_clients,
            releases,
            self.delta,
            dim=self.dim,
        )

    def noise_generator(self, round_index: int, client: int) -> np.random.Generator:
        """Client ``client``'s generator in round ``round_index`` (a fresh CSPRNG if secure)."""
        return self.randomness.generator(randomness_lib.CLIENT_NOISE, round_index, client)

    def encode(self, update: np.ndarray, round_index: int, client: int) -> np.ndarray:
        """Client side: clip to L2 norm ``clip``, quantise, add its integer noise; a ring vector."""
        update = np.asarray(update, np.float64)
        if update.shape != (self.dim,):
            raise ValueError(f"update of shape {update.shape} must be ({self.dim},)")
        norm = float(np.linalg.norm(update))
        clipped = update * min(1.0, self.clip / max(norm, 1e-12))
        noise = client_noise(
            self.kind,
            self.noise_multiplier,
            self.sensitivity_l2,
            self.min_noisy_clients,
            self.dim,
            self.noise_generator(round_index, client),
        )
        return field.add(self.encoder.encode(clipped), field.to_ring(noise, self.bits), self.bits)

    def decode(self, ring_sum: np.ndarray) -> np.ndarray:
        """Server side: the float value of a securely summed ring vector (noise included)."""
        return field.from_ring(ring_sum, self.bits).astype(np.float64) / self.encoder.scale
