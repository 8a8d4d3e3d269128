"""Client local training as one pure, jittable function of the global model and a client's data.

A client starts from the global parameters ``x`` and takes ``S`` steps of minibatch SGD on its own
examples, then reports the *delta* ``y_S - x`` and its number of examples. The steps run in a
``lax.scan`` over one client's padded ``(M, ...)`` arrays; each minibatch is drawn on device with
``jax.random`` among the client's real rows (``mask``), so clients of any size share one compiled
program and the function vmaps over a cohort.

Local objectives:

* FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629): the client's empirical loss
  ``f_k(y)``, minimised by ``S`` SGD steps ``y <- y - lr grad f_k(y; batch)``.
* FedProx (Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127): the proximal objective
  ``f_k(y) + (mu / 2) ||y - x||^2``, whose gradient adds ``mu (y - x)``.
* SCAFFOLD (Karimireddy et al., ICML 2020, https://arxiv.org/abs/1910.06378): corrected steps
  ``y <- y - lr (g_k(y) - c_k + c)`` and, option II, the new client control variate
  ``c_k+ = c_k - c + (x - y_S) / (S lr)``; the client reports ``delta_c = c_k+ - c_k``.
* FedBN (Li et al., ICLR 2021, https://arxiv.org/abs/2102.07623): the FedAvg objective from the
  global shared leaves and the site's own normalisation leaves, which it keeps; only the shared
  leaves' delta is reported (:mod:`fedjax_med.federated.personal`).
* Ditto (Li et al., ICML 2021, https://arxiv.org/abs/2012.04989): the FedAvg objective for the
  global model, then ``S`` steps of the site's personal model on
  ``f_k(v) + (lambda / 2) ||v - x||^2``, which it keeps; only the global model's delta is
  reported.

Local DP-SGD (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133): with ``dp_clip_norm``
set, every local step is one :func:`private_step_release`, built only from the privacy
primitives: the Poisson draw of :mod:`fedjax_med.privacy.sampling` (rows, or patients with at most
``k`` images each), the clipped sum of :mod:`fedjax_med.privacy.clipping` (per example, per layer,
or per patient; ``"vmap"`` or ``"ghost"``; microbatched) and the release
:func:`fedjax_med.privacy.noise.privatize_sum`, ``(sum + N(0, sigma^2 C^2 I)) / L`` with ``L``
the public expected batch size. Each site's delta is then DP with respect to its own examples
(``dp_unit="example"``) or its own patients (``dp_unit="patient"``); :func:`local_dp_epsilon`
gives the per-site epsilon. Nothing else data-dependent is released: ``ClientOutput.loss`` is NaN
under local DP-SGD, and ``num_examples`` (the site's size, the FedAvg weight) is public
metadata outside the guarantee.

Performance: on XLA:CPU a rolled ``lax.scan`` of training steps ran about 4x slower than the
same steps unrolled for the small CNN (each step inside a loop body loses most of its speed),
while on GPU/TPU unrolling only lengthens the compile. :func:`default_unroll` therefore unrolls
the local loop fully on CPU (up to :data:`CPU_FULL_UNROLL_MAX_STEPS` steps) and keeps it rolled
elsewhere; ``unroll=`` overrides it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med import randomness
from fedjax_med.federated import personal
from fedjax_med.models import losses
from fedjax_med.privacy import accounting, clipping, noise, sampling

Params = Any
# Per-example loss: loss_fn(params, images (B, ...), labels (B, ...)) -> (B,).
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]
# Loss of ONE example, the form the privacy code vmaps: loss(params, image, label) -> scalar.
ExampleLossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]

DP_METHODS = clipping.METHODS  # ("vmap", "ghost")
DP_UNITS = ("example", "patient")
CLIENT_OPTIMIZERS = ("sgd", "adam")

# Longest local loop that default_unroll unrolls fully on CPU. Compile time grows linearly with
# the unrolled length while the program is reused by every client and round; past this length the
# compile stops paying for itself (figures in benchmarks/RESULTS.md, "Local loop unrolling").
CPU_FULL_UNROLL_MAX_STEPS = 64


@flax.struct.dataclass
class ClientData:
    """All clients' padded examples on device: the arrays of a ``FederatedDataset``.

    Row ``[k, j]`` is a real example of client ``k`` when ``mask[k, j]``; padding rows are never
    sampled. ``counts[k]`` is the number of real rows of client ``k``. ``unit_ids[k, j]`` (optional)
    is the row's patient within client ``k``, in ``[0, U_k)``, and ``-1`` on padding rows; it is
    what patient-level local DP-SGD (``dp_unit="patient"``) samples and clips by.
    """

    images: jax.Array  # (K, M, ...) float inputs of the loss
    labels: jax.Array  # (K, M, ...)
    mask: jax.Array  # (K, M) bool
    counts: jax.Array  # (K,) int32
    unit_ids: jax.Array | None = None  # (K, M) int32 patient of each row, -1 for padding

    @property
    def num_clients(self) -> int:
        return self.mask.shape[0]


def client_data(
    images: Any,
    labels: Any,
    mask: Any,
    counts: Any,
    *,
    dtype: Any = jnp.float32,
    unit_ids: Any = None,
) -> ClientData:
    """Places a federation's padded arrays on device, images cast to ``dtype``.

    Args:
      images: ``(K, M, ...)`` client images, already normalised (e.g. with
        ``fedjax_med.data.preprocess.Normalizer`` per site), or any loss input.
      labels: ``(K, M, ...)`` labels.
      mask: ``(K, M)`` bool, true for real examples.
      counts: ``(K,)`` number of real examples of each client (``mask.sum(1)``).
      dtype: dtype of the images on device.
      unit_ids: optional ``(K, M)`` int: each row's unit (patient) index within its client, in
        ``[0, M)`` on real rows and ``-1`` on padding rows.

    Returns:
      The :class:`ClientData`.

    Examples:
      >>> import numpy as np
      >>> data = client_data(np.zeros((2, 3, 4)), np.zeros((2, 3), np.int32),
      ...                    np.array([[1, 1, 0], [1, 0, 0]], bool), np.array([2, 1]))
      >>> data.num_clients, data.images.dtype
      (2, dtype('float32'))
    """
    mask = np.asarray(mask, bool)
    counts = np.asarray(counts)
    if mask.ndim != 2:
        raise ValueError(f"mask.shape={mask.shape} must be (num_clients, max_examples)")
    if not np.array_equal(mask.sum(1), counts):
        raise ValueError("counts must equal the number of true entries of each mask row")
    if np.any(counts < 1):
        raise ValueError(f"every client needs >= 1 example; counts={counts.tolist()}")
    images = np.asarray(images)
    labels = np.asarray(labels)
    for name, array in (("images", images), ("labels", labels)):
        if array.shape[:2] != mask.shape:
            raise ValueError(f"{name}.shape={array.shape} must start with mask.shape={mask.shape}")
    if unit_ids is not None:
        unit_ids = _check_unit_ids(unit_ids, mask)
    return ClientData(
        images=jnp.asarray(images, dtype),
        labels=jnp.asarray(labels),
        mask=jnp.asarray(mask),
        counts=jnp.asarray(counts, jnp.int32),
        unit_ids=None if unit_ids is None else jnp.asarray(unit_ids, jnp.int32),
    )


def _check_unit_ids(unit_ids: Any, mask: np.ndarray) -> np.ndarray:
    unit_ids = np.asarray(unit_ids)
    if unit_ids.shape != mask.shape or not np.issubdtype(unit_ids.dtype, np.integer):
        raise ValueError(
            f"unit_ids (shape {unit_ids.shape}, dtype {unit_ids.dtype}) must be an integer "
            f"array of mask.shape={mask.shape}"
        )
    if np.any(unit_ids[~mask] != -1):
        raise ValueError("unit_ids must be -1 on every padding row (mask false)")
    real = unit_ids[mask]
    if real.size and (real.min() < 0 or real.max() >= mask.shape[1]):
        raise ValueError(f"unit_ids of real rows must lie in [0, {mask.shape[1]})")
    return unit_ids


def patient_unit_ids(federated: Any) -> np.ndarray:
    """``(K, M)`` int32 patient index of each row within its client (``-1`` for padding).

    A patient is a ``(site, patient_id)`` pair of the centralized examples (patient ids are unique
    only within a site), as in :mod:`fedjax_med.data.partition`, which keeps each patient's
    images on one client. Client ``k``'s patients are numbered ``0 .. U_k - 1``.

    Args:
      federated: a ``fedjax_med.data.partition.FederatedDataset``.
    """
    central = federated.centralized
    mask = np.asarray(federated.mask, bool)
    index = np.asarray(federated.example_index)
    _, patient_code = np.unique(np.asarray(central.patient_ids), return_inverse=True)
    patient_code = patient_code.reshape(-1).astype(np.int64)
    person = np.asarray(central.sites).astype(np.int64) * (int(patient_code.max()) + 1)
    person = person + patient_code
    unit_ids = np.full(mask.shape, -1, np.int32)
    for k in range(mask.shape[0]):
        _, local = np.unique(person[index[k, mask[k]]], return_inverse=True)
        unit_ids[k, mask[k]] = local.reshape(-1)
    return unit_ids


def num_units(data: ClientData) -> np.ndarray:
    """``(K,)`` number of units (patients) ``U_k`` of each client, from ``data.unit_ids``.

    For per-site accounting of patient-level local DP-SGD: site ``k`` samples its patients at
    rate ``q_k = min(B, U_k) / U_k``, i.e. ``local_dp_epsilon(sigma, B, U_k, steps, delta)``.

    Examples:
      >>> data = client_data(np.zeros((2, 3, 1)), np.zeros((2, 3), np.int32),
      ...                    np.array([[1, 1, 1], [1, 0, 0]], bool), np.array([3, 1]),
      ...                    unit_ids=np.array([[0, 1, 0], [0, -1, -1]]))
      >>> num_units(data).tolist()
      [2, 1]
    """
    if data.unit_ids is None:
        raise ValueError("data.unit_ids is None: build the ClientData with unit_ids")
    ids = np.asarray(data.unit_ids)
    return np.array([np.unique(row[row >= 0]).size for row in ids], np.int64)


def from_federated_dataset(federated: Any, normalizer: Any = None) -> ClientData:
    """The :class:`ClientData` of a ``fedjax_med.data.partition.FederatedDataset``.

    Args:
      federated: the padded federation (``images``, ``labels``, ``mask``, ``counts``,
        ``example_index`` and the ``centralized`` examples with their ``sites``).
      normalizer: a ``fedjax_med.data.preprocess.Normalizer``; each example is standardised with
        its own site's statistics. ``None`` scales uint8 images to ``[0, 1]`` and keeps floats.

    Returns:
      The float32 :class:`ClientData`; padding rows are zero; ``unit_ids`` from
      :func:`patient_unit_ids`.
    """
    mask = np.asarray(federated.mask, bool)
    if normalizer is None:
        images = np.asarray(federated.images)
        images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
    else:
        central = federated.centralized
        flat = normalizer(central.images, central.sites)
        images = np.zeros(mask.shape + flat.shape[1:], np.float32)
        images[mask] = flat[np.asarray(federated.example_index)[mask]]
    return client_data(
        images,
        federated.labels,
        mask,
        federated.counts,
        unit_ids=patient_unit_ids(federated),
    )


@flax.struct.dataclass
class ClientOutput:
    """What one client sends back after local training.

    Attributes:
      delta: ``y_S - x``, local minus global parameters.
      num_examples: the client's number of examples (float32 scalar), the FedAvg weight. Under
        local DP-SGD it is the site's size, released outside the guarantee (public metadata of
        the site, like its name).
      loss: mean of the minibatch losses over the local steps (data loss, without the proximal
        term), each measured at the iterate before its step. Not released under local DP-SGD:
        NaN there (a plaintext loss would be a data-dependent value outside the guarantee).
      control_delta: SCAFFOLD only: ``c_k+ - c_k``; ``None`` otherwise.
      site_params: FedBN's trained local leaves or Ditto's personal model: what the site
        *keeps*, never part of what it submits (no server step reads it; the simulation stores
        it in ``ServerState.site_params`` in place of the site's disk); ``None`` otherwise.
        Under FedBN ``delta`` holds only the shared leaves.
    """

    delta: Params
    num_examples: jax.Array
    loss: jax.Array
    control_delta: Params | None = None
    site_params: Params | None = None


def model_loss(apply_fn: Callable[[Params, jax.Array], jax.Array], task: str) -> LossFn:
    """The per-example loss ``(params, images, labels) -> (B,)`` of a model and task.

    Args:
      apply_fn: ``apply(params, images) -> logits`` (``Model.apply``).
      task: one of :data:`fedjax_med.models.losses.TASKS`.
    """
    if task not in losses.TASKS:
        raise ValueError(f"task={task!r} must be one of {losses.TASKS}")

    def loss_fn(params, images, labels):
        return losses.per_example_loss(apply_fn(params, images), labels, task)

    return loss_fn


def example_loss(loss_fn: LossFn) -> ExampleLossFn:
    """The loss of ONE example, ``(params, image, label) -> scalar``, of a batched ``loss_fn``.

    The form :mod:`fedjax_med.privacy.clipping` vmaps (and ghost clipping traces).

    Examples:
      >>> quadratic = lambda p, x, y: 0.5 * jnp.sum((p - x) ** 2, axis=-1)
      >>> float(example_loss(quadratic)(jnp.zeros(2), jnp.array([3.0, 4.0]), 0))
      12.5
    """

    def one(params, image, label):
        return loss_fn(params, image[None], jnp.asarray(label)[None])[0]

    return one


def default_unroll(local_steps: int, platform: str | None = None) -> int | bool:
    """The ``lax.scan`` unroll of the local loop that ran fastest on each platform.

    CPU: fully unrolled (``True``) up to :data:`CPU_FULL_UNROLL_MAX_STEPS` steps, else rolled:
    on XLA:CPU every step left inside a loop ran several times slower, and a partial unroll
    gained nothing while any loop remained. GPU/TPU: rolled (``1``); unrolling only lengthens
    compiles there. ``python benchmarks/federated.py --unroll`` measures it (figures in
    ``benchmarks/RESULTS.md``, "Local loop unrolling").

    Args:
      local_steps: number of local steps ``S``.
      platform: ``"cpu"``, ``"gpu"``, ``"tpu"``; defaults to ``jax.default_backend()``.

    Examples:
      >>> default_unroll(5, "cpu"), default_unroll(100, "cpu"), default_unroll(5, "gpu")
      (True, 1, 1)
    """
    platform = platform or jax.default_backend()
    if platform == "cpu" and local_steps <= CPU_FULL_UNROLL_MAX_STEPS:
        return True
    return 1


def make_client_optimizer(optimizer: str | optax.GradientTransformation, learning_rate: float):
    """The client optimizer: ``"sgd"`` (plain SGD, as in the papers), ``"adam"`` (Kingma & Ba,
    ICLR 2015, https://arxiv.org/abs/1412.6980, its moments restarted every round) or any optax
    transform."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "sgd":
        return optax.sgd(learning_rate)
    if optimizer == "adam":
        return optax.adam(learning_rate)
    raise ValueError(
        f"client_optimizer={optimizer!r} must be one of {CLIENT_OPTIMIZERS} or an optax "
        "transformation"
    )


def sample_batch(key: jax.Array, mask: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Indices of ``batch_size`` distinct real rows drawn uniformly, and which of them are real.

    A uniform random score per real row and ``+inf`` per padding row; the ``batch_size`` smallest
    scores are a uniform draw without replacement among the real rows. A client with fewer real
    rows than ``batch_size`` gets all of them plus padding rows flagged false.

    Args:
      key: PRNG key of this step.
      mask: ``(M,)`` bool, true for real rows.
      batch_size: rows to draw, ``<= M``.

    Returns:
      ``(indices (batch_size,), is_real (batch_size,))``.
    """
    scores = jnp.where(mask, jax.random.uniform(key, mask.shape), jnp.inf)
    _, indices = jax.lax.top_k(-scores, batch_size)
    return indices, mask[indices]


def local_grad_sum(
    loss: ExampleLossFn,
    *,
    clip_norm: float,
    unit: str = "example",
    method: str = "vmap",
    per_layer: bool = False,
    microbatch_size: int | None = None,
) -> clipping.ClippedGradSum:
    """The clipped sum local DP-SGD uses: :mod:`fedjax_med.privacy.clipping`, nothing else.

    ``unit="example"``: :func:`~fedjax_med.privacy.clipping.clipped_grad_sum` (per example, or
    per layer with ``per_layer``; ``method`` ``"vmap"`` or ``"ghost"``). ``unit="patient"``:
    :func:`~fedjax_med.privacy.clipping.clipped_unit_grad_sum`, each patient's summed gradient
    clipped once (it materialises per-example gradients whatever ``method``: ghost norms are
    per-example norms, not the norm of a patient's sum; the result is the same).

    Args:
      loss: loss of one example (:func:`example_loss`).
      clip_norm: ``C``; unit: ``"example"`` or ``"patient"``; method, per_layer,
        microbatch_size: as in :func:`~fedjax_med.privacy.clipping.clipped_grad_sum`.
    """
    if unit == "example":
        return clipping.clipped_grad_sum(
            loss,
            clip_norm=clip_norm,
            per_layer=per_layer,
            microbatch_size=microbatch_size,
            method=method,
        )
    if unit == "patient":
        if per_layer:
            raise ValueError("dp_per_layer=True is not available with dp_unit='patient'")
        return clipping.clipped_unit_grad_sum(
            loss, clip_norm=clip_norm, unit="patient", microbatch_size=microbatch_size
        )
    raise ValueError(f"dp_unit={unit!r} must be one of {DP_UNITS}")


def private_step_release(
    grad_sum: clipping.ClippedGradSum,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    step_key: jax.Array,
    *,
    rate: jax.Array | float,
    expected_batch_size: jax.Array | float,
    noise_multiplier: float,
    sensitivity: float,
    capacity: int,
    unit_ids: jax.Array | None = None,
    max_per_unit: int | None = None,
) -> tuple[Params, jax.Array]:
    """One local DP-SGD release: Poisson batch, clipped sum, ``(sum + N(0, (sigma S)^2 I)) / L``.

    Abadi et al. 2016 (arXiv:1607.00133), with the batch drawn on device:

    1. the batch key ``fold_in(step_key, STEP_BATCH)`` draws the batch with
       :func:`~fedjax_med.privacy.sampling.poisson_rows` (example level: each real row at rate
       ``q``) or :func:`~fedjax_med.privacy.sampling.poisson_unit_rows` (patient level: each
       patient at rate ``q``, at most ``max_per_unit`` of its rows, chosen uniformly);
    2. ``grad_sum`` (from :func:`local_grad_sum`) sums the clipped contributions in chunks of
       ``capacity`` rows or patients (:func:`~fedjax_med.privacy.sampling.sum_over_chunks`:
       a larger batch gets further chunks, never truncated; a patient's rows are in one chunk);
    3. :func:`~fedjax_med.privacy.noise.privatize_sum` adds ``N(0, (sigma S)^2 I)`` with the
       noise key ``fold_in(step_key, STEP_NOISE)`` (never the batch key) and divides by ``L``.

    :class:`LocalUpdate` calls this at every local step, and the canary audits of
    :mod:`fedjax_med.attacks.canaries` call it, so the audits audit the code that trained.

    Args:
      grad_sum: the clipped sum; its ``unit`` selects the example or patient path.
      params: the iterate the gradient is taken at.
      images, labels: ``(M, ...)`` the client's padded rows.
      mask: ``(M,)`` bool, true for real rows.
      step_key: this step's key; only its ``STEP_BATCH`` and ``STEP_NOISE`` streams are used.
      rate: Poisson rate ``q`` over rows or patients (public).
      expected_batch_size: ``L = q N`` (rows) or ``q U`` (patients), public; never the realised.
      noise_multiplier: ``sigma >= 0`` (Python number).
      sensitivity: ``S`` of the noise, normally ``grad_sum.sensitivity()``.
      capacity: rows (example level) or patients (patient level) per chunk, a Python int.
      unit_ids: patient level: ``(M,)`` patient of each row (``-1`` padding).
      max_per_unit: patient level: ``k``, rows used per sampled patient.

    Returns:
      ``(release, realised)``: the privatised mean gradient (params-shaped) and the realised
      batch size (private: for tests and diagnostics that stay on the client, never sent).

    Guarantees:
      The Poisson-subsampled Gaussian mechanism with sensitivity ``S`` under add/remove-one
      example (or patient): ``accounting.dpsgd_event(sigma, q, 1)`` per call.
    """
    batch_key = jax.random.fold_in(step_key, randomness.STEP_BATCH)
    noise_key = jax.random.fold_in(step_key, randomness.STEP_NOISE)
    if grad_sum.unit == "example":
        order, realised = sampling.poisson_rows(batch_key, mask, rate)

        def chunk(rows, real):
            return grad_sum(params, images[rows], labels[rows], real)[0]

    else:
        if unit_ids is None or max_per_unit is None:
            raise ValueError(f"unit={grad_sum.unit!r} needs unit_ids and max_per_unit")
        ids = jnp.where(mask, unit_ids, -1)
        draw = sampling.poisson_unit_rows(batch_key, ids, rate, max_per_unit)
        order, realised = draw.order, draw.realised
        slots = jnp.repeat(jnp.arange(capacity), max_per_unit)

        def chunk(units, real):
            rows = draw.rows[units]  # (capacity, k): each patient's rows, in its own slot
            row_real = ((rows >= 0) & real[:, None]).reshape(-1)
            rows = jnp.maximum(rows, 0).reshape(-1)
            total, _ = grad_sum(params, images[rows], labels[rows], row_real, slots, capacity)
            return total

    total = sampling.sum_over_chunks(chunk, order, realised, capacity)
    release = noise.privatize_sum(
        total, noise_key, noise_multiplier, sensitivity, expected_batch_size
    )
    return release, realised


def local_rate(batch_size: int, population: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(q, L)`` of a site: ``L = min(B, N)`` expected rows (patients), ``q = L / N``.

    ``N`` is the site's number of examples (example level) or patients ``U_k`` (patient level).

    Examples:
      >>> q, expected = local_rate(4, jnp.asarray(10))
      >>> round(float(q), 6), float(expected)
      (0.4, 4.0)
    """
    n = jnp.maximum(jnp.asarray(population, jnp.float32), 1.0)
    expected = jnp.minimum(float(batch_size), n)
    return expected / n, expected


@dataclasses.dataclass(frozen=True)
class LocalUpdate:
    """Local training of one client, callable as a pure function (see :func:`make_local_update`).

    ``__call__(global_params, images, labels, mask, count, key, server_control=None,
    client_control=None, unit_ids=None, site_params=None) -> ClientOutput``.

    FedBN (``split`` with a predicate, Li et al. 2021, arXiv:2102.07623): training starts from
    ``merge(shared(x), theta_l^k)`` with the site's own local leaves ``site_params``; the delta
    holds only the shared leaves and the trained local leaves are returned as ``site_params``.
    Ditto (``ditto_lambda``, Li et al. 2021, arXiv:2012.04989, Algorithm 1): after the global
    model's ``S`` steps, the personal model ``v_k = site_params`` takes ``S`` steps of the same
    local training on ``f_k(v) + (lambda / 2) ||v - x||^2`` (keys from
    ``fold_in(key, randomness.CLIENT_PERSONAL)``; privatised like the others under local DP-SGD).
    """

    loss_fn: LossFn
    local_steps: int
    batch_size: int
    learning_rate: float
    optimizer: optax.GradientTransformation
    optimizer_name: str  # "sgd", or "custom" for a user-supplied optax transformation
    prox_mu: float
    scaffold: bool
    unroll: int | bool
    dp_clip_norm: float | None = None  # None: no local DP-SGD
    dp_noise_multiplier: float = 0.0
    dp_method: str = "vmap"
    dp_per_layer: bool = False
    dp_microbatch_size: int | None = None
    dp_unit: str = "example"
    dp_max_per_unit: int | None = None
    split: personal.ParamSplit = personal.ALL_SHARED  # FedBN: the leaves that stay at the site
    ditto_lambda: float | None = None  # Ditto's lambda; None: no personal model

    @property
    def keeps_site_params(self) -> bool:
        """Whether the site keeps parameters of its own between rounds (FedBN or Ditto)."""
        return self.split.keeps_local or self.ditto_lambda is not None

    @property
    def steps_per_round(self) -> int:
        """Steps on the site's data per call: ``S``, or ``2 S`` with Ditto's personal steps.

        Under local DP-SGD each is a release the site's ledger counts.
        """
        return self.local_steps * (2 if self.ditto_lambda is not None else 1)

    @property
    def private(self) -> bool:
        """Whether local DP-SGD is on (``dp_clip_norm`` set)."""
        return self.dp_clip_norm is not None

    def grad_sum(self) -> clipping.ClippedGradSum:
        """The clipped sum of this update's local DP-SGD (:func:`local_grad_sum`)."""
        return local_grad_sum(
            example_loss(self.loss_fn),
            clip_norm=self.dp_clip_norm,
            unit=self.dp_unit,
            method=self.dp_method,
            per_layer=self.dp_per_layer,
            microbatch_size=self.dp_microbatch_size,
        )

    def private_gradient(
        self,
        params: Params,
        images: jax.Array,
        labels: jax.Array,
        mask: jax.Array,
        count: jax.Array,
        step_key: jax.Array,
        unit_ids: jax.Array | None = None,
    ) -> tuple[Params, jax.Array]:
        """One step's private gradient: :func:`private_step_release` at the site's ``(q, L)``.

        ``q = L / N`` and ``L = min(batch_size, N)`` with ``N`` the site's examples (``count``)
        or, at patient level, its patients (the distinct ``unit_ids`` of real rows).
        """
        grad_sum = self.grad_sum()
        rows = mask.shape[0]
        if self.dp_unit == "patient":
            if unit_ids is None:
                raise ValueError(
                    "dp_unit='patient' needs unit_ids (ClientData.unit_ids of this client)"
                )
            unit_ids = jnp.where(mask, jnp.asarray(unit_ids, jnp.int32), -1)
            population = sampling.unit_counts(unit_ids)
        else:
            population = count
        rate, expected = local_rate(self.batch_size, population)
        return private_step_release(
            grad_sum,
            params,
            images,
            labels,
            mask,
            step_key,
            rate=rate,
            expected_batch_size=expected,
            noise_multiplier=self.dp_noise_multiplier,
            sensitivity=grad_sum.sensitivity(),
            capacity=min(sampling.poisson_chunk_size(self.batch_size), rows),
            unit_ids=unit_ids,
            max_per_unit=self.dp_max_per_unit,
        )

    def __call__(
        self,
        global_params: Params,
        images: jax.Array,
        labels: jax.Array,
        mask: jax.Array,
        count: jax.Array,
        key: jax.Array,
        server_control: Params | None = None,
        client_control: Params | None = None,
        unit_ids: jax.Array | None = None,
        site_params: Params | None = None,
    ) -> ClientOutput:
        """Runs ``local_steps`` steps from ``global_params`` on one client's padded arrays.

        Args:
          global_params: the server model ``x``.
          images: ``(M, ...)`` the client's padded inputs.
          labels: ``(M, ...)`` its labels.
          mask: ``(M,)`` bool, true for real rows.
          count: number of real rows, reported as ``num_examples``.
          key: PRNG key of this client in this round.
          server_control: SCAFFOLD's ``c`` (params-shaped).
          client_control: SCAFFOLD's ``c_k`` (params-shaped).
          unit_ids: ``(M,)`` patient of each row (``ClientData.unit_ids[k]``); needed by
            ``dp_unit="patient"``, unused otherwise.
          site_params: what the site keeps between rounds: FedBN's local leaves
            (``split.local``), or Ditto's personal model ``v_k``; ``None`` otherwise.

        Returns:
          The :class:`ClientOutput` (``loss`` NaN under local DP-SGD).
        """
        _check_dp(self)
        if self.scaffold and (server_control is None or client_control is None):
            raise ValueError("scaffold=True needs server_control and client_control")
        if self.scaffold and self.optimizer_name != "sgd":
            raise ValueError("scaffold=True needs client_optimizer='sgd' (option II assumes SGD)")
        if self.keeps_site_params and site_params is None:
            raise ValueError("a FedBN or Ditto local update needs the site's site_params")
        data = (images, labels, mask, count, unit_ids)
        x = global_params
        if self.split.keeps_local:
            # FedBN: the global shared leaves with the site's own normalisation leaves.
            x = self.split.merge(self.split.shared(global_params), site_params)
        correction = None
        if self.scaffold:
            # g - c_k + c: the correction is constant over the local steps.
            correction = jax.tree.map(jnp.subtract, server_control, client_control)
        y, loss = self._steps(x, x, self.prox_mu, correction, key, data)
        delta = jax.tree.map(jnp.subtract, y, x)
        kept = None
        if self.split.keeps_local:
            kept = self.split.local(y)
        if self.ditto_lambda is not None:
            # Ditto: v_k's own steps on f_k(v) + (lambda / 2) ||v - w^t||^2, w^t = global_params.
            personal_key = jax.random.fold_in(key, randomness.CLIENT_PERSONAL)
            kept, _ = self._steps(
                site_params, global_params, self.ditto_lambda, None, personal_key, data
            )
        control_delta = None
        if self.scaffold:
            # Option II: c_k+ - c_k = -c + (x - y) / (S lr) = -c - delta / (S lr).
            scale = 1.0 / (self.local_steps * self.learning_rate)
            control_delta = jax.tree.map(lambda c, d: -c - scale * d, server_control, delta)
        return ClientOutput(
            delta=self.split.shared(delta),
            num_examples=jnp.asarray(count, jnp.float32),
            loss=loss,
            control_delta=control_delta,
            site_params=kept,
        )

    def _steps(self, start, anchor, mu, correction, key, data):
        """``local_steps`` steps from ``start`` with the proximal term ``mu (y - anchor)``.

        Returns ``(y_S, mean minibatch loss)`` (NaN under local DP-SGD).
        """
        images, labels, mask, count, unit_ids = data
        batch_size = min(self.batch_size, mask.shape[0])

        def minibatch_loss(params, batch_images, batch_labels, is_real):
            per_example = self.loss_fn(params, batch_images, batch_labels)
            total = jnp.sum(jnp.where(is_real, per_example, 0.0))
            return total / jnp.maximum(jnp.sum(is_real), 1)

        def step(carry, step_key):
            y, opt_state = carry
            if self.private:
                grads, _ = self.private_gradient(y, images, labels, mask, count, step_key, unit_ids)
                loss = jnp.float32(jnp.nan)  # not released under local DP-SGD
            else:
                idx, is_real = sample_batch(step_key, mask, batch_size)
                loss, grads = jax.value_and_grad(minibatch_loss)(
                    y, images[idx], labels[idx], is_real
                )
            if mu:
                grads = jax.tree.map(lambda g, p, p0: g + mu * (p - p0), grads, y, anchor)
            if correction is not None:
                grads = jax.tree.map(jnp.add, grads, correction)
            updates, opt_state = self.optimizer.update(grads, opt_state, y)
            return (optax.apply_updates(y, updates), opt_state), loss

        step_keys = jax.random.split(key, self.local_steps)
        (y, _), step_losses = jax.lax.scan(
            step, (start, self.optimizer.init(start)), step_keys, unroll=self.unroll
        )
        return y, jnp.mean(step_losses)


def make_local_update_for_loss(
    loss_fn: LossFn,
    *,
    local_steps: int,
    batch_size: int,
    client_lr: float,
    client_optimizer: str | optax.GradientTransformation = "sgd",
    prox_mu: float = 0.0,
    scaffold: bool = False,
    unroll: int | bool | None = None,
    dp_clip_norm: float | None = None,
    dp_noise_multiplier: float = 0.0,
    dp_method: str = "vmap",
    dp_per_layer: bool = False,
    dp_microbatch_size: int | None = None,
    dp_unit: str = "example",
    dp_max_per_unit: int | None = None,
    split: personal.ParamSplit = personal.ALL_SHARED,
    ditto_lambda: float | None = None,
) -> LocalUpdate:
    """Local training for any per-example loss ``loss_fn(params, images, labels) -> (B,)``.

    Same arguments as :func:`make_local_update` with ``loss_fn`` in place of the model and task;
    useful for losses with gradients known in closed form.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> quadratic = lambda p, x, y: 0.5 * jnp.sum((p["w"] - x) ** 2, axis=-1)
      >>> update = make_local_update_for_loss(quadratic, local_steps=1, batch_size=2,
      ...                                     client_lr=0.5)
      >>> out = update({"w": jnp.zeros(1)}, jnp.array([[2.0], [4.0]]), jnp.zeros(2),
      ...              jnp.array([True, True]), 2, jax.random.key(0))
      >>> out.delta["w"].tolist(), float(out.num_examples)  # -0.5 * (0 - mean(2, 4))
      ([1.5], 2.0)
    """
    if isinstance(local_steps, bool) or int(local_steps) != local_steps or local_steps < 1:
        raise ValueError(f"{local_steps=} must be a positive integer")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"{batch_size=} must be a positive integer")
    if not client_lr > 0:
        raise ValueError(f"{client_lr=} must be > 0")
    if not prox_mu >= 0:
        raise ValueError(f"{prox_mu=} must be >= 0")
    if scaffold and client_optimizer != "sgd":
        # Option II's (x - y) / (S lr) is the mean corrected gradient only for plain SGD.
        raise ValueError("scaffold=True needs client_optimizer='sgd' (option II assumes SGD)")
    if unroll is None:
        unroll = default_unroll(int(local_steps))
    update = LocalUpdate(
        loss_fn=loss_fn,
        local_steps=int(local_steps),
        batch_size=int(batch_size),
        learning_rate=float(client_lr),
        optimizer=make_client_optimizer(client_optimizer, client_lr),
        optimizer_name=client_optimizer if isinstance(client_optimizer, str) else "custom",
        prox_mu=float(prox_mu),
        scaffold=bool(scaffold),
        unroll=unroll,
        dp_clip_norm=None if dp_clip_norm is None else float(dp_clip_norm),
        dp_noise_multiplier=float(dp_noise_multiplier),
        dp_method=dp_method,
        dp_per_layer=bool(dp_per_layer),
        dp_microbatch_size=dp_microbatch_size,
        dp_unit=dp_unit,
        dp_max_per_unit=dp_max_per_unit,
        split=split,
        ditto_lambda=None if ditto_lambda is None else float(ditto_lambda),
    )
    _check_dp(update)
    check_site_params(update)
    return update


def make_local_update(
    apply_fn: Callable[[Params, jax.Array], jax.Array],
    task: str,
    *,
    local_steps: int,
    batch_size: int,
    client_lr: float,
    client_optimizer: str | optax.GradientTransformation = "sgd",
    prox_mu: float = 0.0,
    scaffold: bool = False,
    unroll: int | bool | None = None,
    dp_clip_norm: float | None = None,
    dp_noise_multiplier: float = 0.0,
    dp_method: str = "vmap",
    dp_per_layer: bool = False,
    dp_microbatch_size: int | None = None,
    dp_unit: str = "example",
    dp_max_per_unit: int | None = None,
    split: personal.ParamSplit = personal.ALL_SHARED,
    ditto_lambda: float | None = None,
) -> LocalUpdate:
    """Builds a client's local training: ``S`` minibatch steps of (FedProx / SCAFFOLD) SGD.

    Each step draws ``min(batch_size, M)`` distinct real rows uniformly (:func:`sample_batch`),
    takes the mean loss over them and updates ``y``; FedProx adds ``mu (y - x)`` to the gradient
    (Li et al. 2020, arXiv:1812.06127), SCAFFOLD adds ``c - c_k`` and returns option II's control
    delta (Karimireddy et al. 2020, arXiv:1910.06378). The returned delta is ``y_S - x``.

    Local DP-SGD (Abadi et al. 2016, arXiv:1607.00133), when ``dp_clip_norm`` is set: each step's
    gradient is :func:`private_step_release`: the site's rows (``dp_unit="example"``) or patients
    (``"patient"``, at most ``dp_max_per_unit`` images each) are Poisson-sampled at rate
    ``q = L / N`` with ``N`` the site's examples or patients and ``L = min(batch_size, N)``; the
    contributions are clipped to ``C`` (per example, per layer with ``dp_per_layer``, or per
    patient) by :mod:`fedjax_med.privacy.clipping` (``dp_method``, ``dp_microbatch_size``) and
    summed, and :func:`fedjax_med.privacy.noise.privatize_sum` adds ``N(0, sigma^2 C^2 I)``
    (noise key ``fold_in(step_key, STEP_NOISE)``, batch key ``fold_in(step_key, STEP_BATCH)``)
    and divides by ``L`` (public; never the realised size); then the optimizer is applied.
    FedProx's ``mu (y - x)`` is added after the noise (it reads no data). SCAFFOLD is refused: its
    control variates are data-dependent and not privatised.

    Guarantees (local DP-SGD): each local step is the Poisson-subsampled Gaussian mechanism on
    the site's ``N`` examples (patients) under add/remove-one example (patient), sensitivity
    ``C``, accounted by ``accounting.dpsgd_event(sigma, L / N, steps)``; the per-site epsilon
    over all its local steps is :func:`local_dp_epsilon` (with ``num_examples = N``, from
    :func:`num_units` at patient level). The delta is the only data-dependent value sent:
    ``loss`` is NaN, and ``num_examples`` (the site's size) is public metadata outside the
    guarantee.

    Args:
      apply_fn: ``apply(params, images) -> logits`` (``Model.apply``).
      task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
      local_steps: number of local steps ``S``.
      batch_size: examples per local step (capped at the padded client length ``M``); under
        local DP-SGD the expected number of examples (patients) per step, ``L = min(B, N)``.
      client_lr: local learning rate ``lr``.
      client_optimizer: ``"sgd"`` or an optax transformation (initialised afresh each round).
      prox_mu: FedProx ``mu`` (0 = FedAvg).
      scaffold: whether to apply SCAFFOLD's correction (requires ``"sgd"``).
      unroll: ``lax.scan`` unroll of the local loop; ``None`` = :func:`default_unroll`.
      dp_clip_norm: local DP-SGD clipping norm ``C > 0`` (``math.inf``: no clipping, only with
        zero noise); ``None`` turns local DP-SGD off (and the other ``dp_*`` options are unused).
      dp_noise_multiplier: local DP-SGD ``sigma >= 0``; the noise stddev is ``sigma C``.
      dp_method: ``"vmap"`` (per-example gradients) or ``"ghost"`` (ghost clipping); equal
        results. At patient level the per-patient sum always uses per-example gradients.
      dp_per_layer: clip each parameter leaf to ``C / sqrt(#leaves)`` (example level only).
      dp_microbatch_size: ``None`` or rows per microbatch of the clipped sum (bounds memory).
      dp_unit: ``"example"`` or ``"patient"`` (needs ``unit_ids`` in the call).
      dp_max_per_unit: ``dp_unit="patient"`` only: ``k >= 1`` images per sampled patient.
      split: FedBN: the leaves that stay at the site
        (:data:`fedjax_med.federated.personal.NORM_LOCAL`); default: all shared.
      ditto_lambda: Ditto's ``lambda`` in ``[0, 2 / client_lr)`` for SGD: the site also trains
        its personal model (``None``: no personal model).

    Returns:
      A :class:`LocalUpdate`, a pure function of one client's arrays.
    """
    return make_local_update_for_loss(
        model_loss(apply_fn, task),
        local_steps=local_steps,
        batch_size=batch_size,
        client_lr=client_lr,
        client_optimizer=client_optimizer,
        prox_mu=prox_mu,
        scaffold=scaffold,
        unroll=unroll,
        dp_clip_norm=dp_clip_norm,
        dp_noise_multiplier=dp_noise_multiplier,
        dp_method=dp_method,
        dp_per_layer=dp_per_layer,
        dp_microbatch_size=dp_microbatch_size,
        dp_unit=dp_unit,
        dp_max_per_unit=dp_max_per_unit,
        split=split,
        ditto_lambda=ditto_lambda,
    )


def check_site_params(update: LocalUpdate) -> None:
    """Raises for a FedBN or Ditto local update that cannot run as asked."""
    lam = update.ditto_lambda
    if update.keeps_site_params and update.scaffold:
        raise ValueError("scaffold=True cannot be combined with FedBN or Ditto (per-site models)")
    if update.split.keeps_local and lam is not None:
        raise ValueError("a local update runs FedBN (split) or Ditto (ditto_lambda), not both")
    if lam is None:
        return
    if not lam >= 0:
        raise ValueError(f"ditto_lambda={lam} must be >= 0")
    # v - w contracts by (1 - lr lambda) per plain SGD step: beyond 2 / lr it diverges.
    if update.optimizer_name == "sgd" and not lam * update.learning_rate < 2:
        raise ValueError(
            f"ditto_lambda={lam} must be < 2 / client_lr = {2 / update.learning_rate:g} (the "
            "proximal step of Ditto's Algorithm 1 diverges beyond it)"
        )


def _check_dp(update: LocalUpdate) -> None:
    """Raises naming the ``dp_*`` argument and its allowed values."""
    sigma, clip = update.dp_noise_multiplier, update.dp_clip_norm
    if not sigma >= 0:
        raise ValueError(f"dp_noise_multiplier={sigma} must be >= 0")
    if clip is None:
        if sigma:
            raise ValueError(f"dp_noise_multiplier={sigma} > 0 needs dp_clip_norm (noise sigma C)")
        return
    if not clip > 0:
        raise ValueError(f"dp_clip_norm={clip} must be > 0 (or None to turn local DP-SGD off)")
    if sigma and clip == float("inf"):
        raise ValueError(f"dp_clip_norm={clip} must be finite when dp_noise_multiplier > 0")
    if update.scaffold:
        raise ValueError(
            "scaffold=True cannot be combined with local DP-SGD (dp_clip_norm): SCAFFOLD's "
            "control variates are data-dependent and not privatised"
        )
    if update.dp_method not in DP_METHODS:
        raise ValueError(f"dp_method={update.dp_method!r} must be one of {DP_METHODS}")
    if update.dp_unit not in DP_UNITS:
        raise ValueError(f"dp_unit={update.dp_unit!r} must be one of {DP_UNITS}")
    micro = update.dp_microbatch_size
    if micro is not None and (isinstance(micro, bool) or not isinstance(micro, int) or micro < 1):
        raise ValueError(f"dp_microbatch_size={micro!r} must be None or an integer >= 1")
    k = update.dp_max_per_unit
    if update.dp_unit == "patient":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"dp_max_per_unit={k!r} must be an integer >= 1 for dp_unit='patient'")
        if update.dp_per_layer:
            raise ValueError("dp_per_layer=True is not available with dp_unit='patient'")
    elif k is not None:
        raise ValueError(f"dp_max_per_unit={k!r} must be None unless dp_unit='patient'")


def local_dp_epsilon(
    noise_multiplier: float,
    batch_size: int,
    num_examples: int,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Per-site epsilon of local DP-SGD after ``steps`` local steps in total (all rounds).

    Each local step of :func:`make_local_update` with ``dp_clip_norm`` set Poisson-samples the
    site's ``n`` examples with rate ``q = min(batch_size, n) / n`` and adds
    ``N(0, sigma^2 C^2 I)`` to their clipped sum (Abadi et al. 2016, arXiv:1607.00133). At
    patient level (``dp_unit="patient"``) pass the site's number of patients ``U_k``
    (:func:`num_units`) as ``num_examples``: then ``q_k = min(B, U_k) / U_k`` over patients and
    the guarantee is for adding or removing one of the site's patients. This is
    ``accounting.dpsgd_event(sigma, q, steps)`` (Poisson, add/remove-one neighbours,
    sensitivity ``C``) evaluated by ``accounting.epsilon``.

    Args:
      noise_multiplier: ``sigma >= 0`` (``dp_noise_multiplier``); ``0`` gives ``inf``.
      batch_size: the ``batch_size`` of the local update (``B``).
      num_examples: the site's number of real examples ``n >= 1`` (patients ``U_k`` at patient
        level).
      steps: local steps the site has taken in total, ``>= 0`` (``0`` gives ``0.0``).
      delta: in ``(0, 1)``.
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      The site's epsilon at ``delta``, for its own examples under add/remove-one neighbouring.

    Guarantees:
      The site's deltas over those steps, and anything computed from them, are
      ``(epsilon, delta)``-DP with respect to adding or removing one of the site's examples.

    Examples:
      >>> local_dp_epsilon(1.0, 10, 100, 0, 1e-5)
      0.0
      >>> local_dp_epsilon(1.0, 10, 100, 100, 1e-5) < local_dp_epsilon(1.0, 10, 100, 200, 1e-5)
      True
    """
    accounting.check_steps(steps)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"{batch_size=} must be a positive integer")
    if isinstance(num_examples, bool) or int(num_examples) != num_examples or num_examples < 1:
        raise ValueError(f"{num_examples=} must be a positive integer")
    accounting.check_delta(delta)
    accounting.check_accountant(accountant)
    if not noise_multiplier >= 0:
        raise ValueError(f"{noise_multiplier=} must be >= 0")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    n = int(num_examples)
    b = min(int(batch_size), n)
    event = accounting.dpsgd_event(noise_multiplier, b / n, int(steps))
    return accounting.epsilon(event, delta, accountant)
