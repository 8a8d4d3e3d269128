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

Local DP-SGD (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133): with ``dp_clip_norm``
set, every local step Poisson-samples the site's examples (rate ``q = L / n``, ``L = min(B, n)``),
clips each sampled example's gradient to ``C``, sums, adds ``N(0, sigma^2 C^2 I)`` and divides by
``L``, so each site's delta is example-level DP with respect to that site's own examples;
:func:`local_dp_epsilon` gives the per-site epsilon.

Performance: on XLA:CPU a rolled ``lax.scan`` of training steps ran about 4x slower than the
same steps unrolled for the small CNN (each step inside a loop body loses most of its speed),
while on GPU/TPU unrolling only lengthens the compile. :func:`default_unroll` therefore unrolls
the local loop fully on CPU (up to :data:`CPU_FULL_UNROLL_MAX_STEPS` steps) and keeps it rolled
elsewhere; ``unroll=`` overrides it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med.models import losses
from fedjax_med.privacy import accounting, clipping, noise

Params = Any
# Per-example loss: loss_fn(params, images (B, ...), labels (B, ...)) -> (B,).
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]

# Longest local loop that default_unroll unrolls fully on CPU. Compile time grows linearly with
# the unrolled length (small CNN: 3 s at 5 steps, 5 s at 20, 12 s at 50), while the program is
# reused by every client and round; past this length the compile stops paying for itself quickly.
CPU_FULL_UNROLL_MAX_STEPS = 64


@flax.struct.dataclass
class ClientData:
    """All clients' padded examples on device: the arrays of a ``FederatedDataset``.

    Row ``[k, j]`` is a real example of client ``k`` when ``mask[k, j]``; padding rows are never
    sampled. ``counts[k]`` is the number of real rows of client ``k``.
    """

    images: jax.Array  # (K, M, ...) float inputs of the loss
    labels: jax.Array  # (K, M, ...)
    mask: jax.Array  # (K, M) bool
    counts: jax.Array  # (K,) int32

    @property
    def num_clients(self) -> int:
        return self.mask.shape[0]


def client_data(
    images: Any, labels: Any, mask: Any, counts: Any, *, dtype: Any = jnp.float32
) -> ClientData:
    """Places a federation's padded arrays on device, images cast to ``dtype``.

    Args:
      images: ``(K, M, ...)`` client images, already normalised (e.g. with
        ``fedjax_med.data.preprocess.Normalizer`` per site), or any loss input.
      labels: ``(K, M, ...)`` labels.
      mask: ``(K, M)`` bool, true for real examples.
      counts: ``(K,)`` number of real examples of each client (``mask.sum(1)``).
      dtype: dtype of the images on device.

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
    return ClientData(
        images=jnp.asarray(images, dtype),
        labels=jnp.asarray(labels),
        mask=jnp.asarray(mask),
        counts=jnp.asarray(counts, jnp.int32),
    )


def from_federated_dataset(federated: Any, normalizer: Any = None) -> ClientData:
    """The :class:`ClientData` of a ``fedjax_med.data.partition.FederatedDataset``.

    Args:
      federated: the padded federation (``images``, ``labels``, ``mask``, ``counts``,
        ``example_index`` and the ``centralized`` examples with their ``sites``).
      normalizer: a ``fedjax_med.data.preprocess.Normalizer``; each example is standardised with
        its own site's statistics. ``None`` scales uint8 images to ``[0, 1]`` and keeps floats.

    Returns:
      The float32 :class:`ClientData`; padding rows are zero.
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
    return client_data(images, federated.labels, mask, federated.counts)


@flax.struct.dataclass
class ClientOutput:
    """What one client sends back after local training.

    Attributes:
      delta: ``y_S - x``, local minus global parameters.
      num_examples: the client's number of examples (float32 scalar), the FedAvg weight.
      loss: mean of the minibatch losses over the local steps (data loss, without the proximal
        term), each measured at the iterate before its step.
      control_delta: SCAFFOLD only: ``c_k+ - c_k``; ``None`` otherwise.
    """

    delta: Params
    num_examples: jax.Array
    loss: jax.Array
    control_delta: Params | None = None


def model_loss(apply_fn: Callable[[Params, jax.Array], jax.Array], task: str) -> LossFn:
    """The per-example loss ``(params, images, labels) -> (B,)`` of a model and task.

    Args:
      apply_fn: ``apply(params, images) -> logits`` (``Model.apply``).
      task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
    """
    losses.per_example_loss(jnp.zeros((1, 1)), jnp.zeros((1,), jnp.int32), task)  # checks task

    def loss_fn(params, images, labels):
        return losses.per_example_loss(apply_fn(params, images), labels, task)

    return loss_fn


def default_unroll(local_steps: int, platform: str | None = None) -> int | bool:
    """The ``lax.scan`` unroll of the local loop that ran fastest on each platform.

    CPU: fully unrolled (``True``) up to :data:`CPU_FULL_UNROLL_MAX_STEPS` steps, else rolled.
    On XLA:CPU every step left inside a loop ran about 4x slower (small CNN, 32x32x1, batch 32:
    33-38 ms per rolled step against 8.5-9.5 ms unrolled), and a partial unroll (8) gained
    nothing while any loop remained. GPU/TPU: rolled (``1``); unrolling only lengthens compiles
    there. Measured with ``python benchmarks/federated.py --unroll``.

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


def make_optimizer(optimizer: str | optax.GradientTransformation, learning_rate: float):
    """The client optimizer: ``"sgd"`` (plain SGD, as in the papers) or any optax transform."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "sgd":
        return optax.sgd(learning_rate)
    raise ValueError(f"client_optimizer={optimizer!r} must be 'sgd' or an optax transformation")


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


def poisson_chunk_size(expected_batch: int) -> int:
    """Rows per chunk of a Poisson batch of mean ``L``: ``L + 3 sqrt(L)`` (rarely exceeded)."""
    return int(expected_batch + math.ceil(3 * math.sqrt(expected_batch)))


def poisson_rows(key: jax.Array, mask: jax.Array, rate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Poisson sampling of real rows: each independently with probability ``rate``.

    Returns ``(order, realised)``: a permutation of the rows with the ``realised`` sampled rows
    first (in random order), so ``order[:realised]`` is the batch. The draw is exactly the
    sampling that ``PoissonSampledDpEvent(rate, .)`` assumes.
    """
    u = jax.random.uniform(key, mask.shape)
    selected = mask & (u < rate)
    order = jnp.argsort(jnp.where(selected, u, 2.0 + u))
    return order, jnp.sum(selected)


@dataclasses.dataclass(frozen=True)
class LocalUpdate:
    """Local training of one client, callable as a pure function (see :func:`make_local_update`).

    ``__call__(global_params, images, labels, mask, count, key, server_control=None,
    client_control=None) -> ClientOutput``.
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

        Returns:
          The :class:`ClientOutput`.
        """
        _check_dp(self.dp_clip_norm, self.dp_noise_multiplier, self.scaffold)
        if self.scaffold and (server_control is None or client_control is None):
            raise ValueError("scaffold=True needs server_control and client_control")
        if self.scaffold and self.optimizer_name != "sgd":
            raise ValueError("scaffold=True needs client_optimizer='sgd' (option II assumes SGD)")
        batch_size = min(self.batch_size, mask.shape[0])
        x = global_params
        if self.scaffold:
            # g - c_k + c: the correction is constant over the local steps.
            correction = jax.tree.map(jnp.subtract, server_control, client_control)

        def minibatch_loss(params, batch_images, batch_labels, is_real):
            per_example = self.loss_fn(params, batch_images, batch_labels)
            total = jnp.sum(jnp.where(is_real, per_example, 0.0))
            return total / jnp.maximum(jnp.sum(is_real), 1)

        def example_loss(params, example_image, example_label):
            return self.loss_fn(params, example_image[None], example_label[None])[0]

        def clipped_chunk(params, idx, is_real):
            per_example, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(
                params, images[idx], labels[idx]
            )
            # where(), not a product with 0: a padding row's gradient may be NaN.
            grads = jax.tree.map(
                lambda g: jnp.where(is_real.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0), grads
            )
            clipped, _ = clipping.clip_per_example(grads, self.dp_clip_norm)
            total = jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped)
            return total, jnp.sum(jnp.where(is_real, per_example, 0.0))

        capacity = min(poisson_chunk_size(self.batch_size), mask.shape[0])

        def private_grads(params, step_key):
            # Abadi et al. 2016: Poisson-sample rows with q = L / n (L = min(B, n), public),
            # (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / L.
            n = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
            expected = jnp.minimum(float(self.batch_size), n)
            order, realised = poisson_rows(step_key, mask, expected / n)
            padded = jnp.concatenate([order, jnp.zeros(capacity, order.dtype)])
            slots = jnp.arange(capacity)
            total, loss_sum = clipped_chunk(params, padded[:capacity], slots < realised)

            # A batch larger than the chunk is processed in further chunks, never truncated.
            def more(carry):
                return carry[0] * capacity < realised

            def next_chunk(carry):
                i, acc, acc_loss = carry
                start = i * capacity
                idx = jax.lax.dynamic_slice(padded, (start,), (capacity,))
                chunk_total, chunk_loss = clipped_chunk(params, idx, start + slots < realised)
                acc = jax.tree.map(jnp.add, acc, chunk_total)
                return i + 1, acc, acc_loss + chunk_loss

            _, total, loss_sum = jax.lax.while_loop(more, next_chunk, (1, total, loss_sum))
            if self.dp_noise_multiplier:
                stddev = self.dp_noise_multiplier * self.dp_clip_norm
                total = noise.add_gaussian_noise(total, jax.random.fold_in(step_key, 1), stddev)
            # Diagnostic only: the reported loss is not privatised.
            loss = loss_sum / jnp.maximum(realised, 1)
            return loss, jax.tree.map(lambda g: g / expected, total)

        def step(carry, step_key):
            y, opt_state = carry
            if self.dp_clip_norm is None:
                idx, is_real = sample_batch(step_key, mask, batch_size)
                loss, grads = jax.value_and_grad(minibatch_loss)(
                    y, images[idx], labels[idx], is_real
                )
            else:
                loss, grads = private_grads(y, step_key)
            if self.prox_mu:
                grads = jax.tree.map(lambda g, p, p0: g + self.prox_mu * (p - p0), grads, y, x)
            if self.scaffold:
                grads = jax.tree.map(jnp.add, grads, correction)
            updates, opt_state = self.optimizer.update(grads, opt_state, y)
            return (optax.apply_updates(y, updates), opt_state), loss

        step_keys = jax.random.split(key, self.local_steps)
        (y, _), step_losses = jax.lax.scan(
            step, (x, self.optimizer.init(x)), step_keys, unroll=self.unroll
        )
        delta = jax.tree.map(jnp.subtract, y, x)
        control_delta = None
        if self.scaffold:
            # Option II: c_k+ - c_k = -c + (x - y) / (S lr) = -c - delta / (S lr).
            scale = 1.0 / (self.local_steps * self.learning_rate)
            control_delta = jax.tree.map(lambda c, d: -c - scale * d, server_control, delta)
        return ClientOutput(
            delta=delta,
            num_examples=jnp.asarray(count, jnp.float32),
            loss=jnp.mean(step_losses),
            control_delta=control_delta,
        )


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
    _check_dp(dp_clip_norm, dp_noise_multiplier, scaffold)
    if unroll is None:
        unroll = default_unroll(int(local_steps))
    return LocalUpdate(
        loss_fn=loss_fn,
        local_steps=int(local_steps),
        batch_size=int(batch_size),
        learning_rate=float(client_lr),
        optimizer=make_optimizer(client_optimizer, client_lr),
        optimizer_name="sgd" if client_optimizer == "sgd" else "custom",
        prox_mu=float(prox_mu),
        scaffold=bool(scaffold),
        unroll=unroll,
        dp_clip_norm=None if dp_clip_norm is None else float(dp_clip_norm),
        dp_noise_multiplier=float(dp_noise_multiplier),
    )


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
) -> LocalUpdate:
    """Builds a client's local training: ``S`` minibatch steps of (FedProx / SCAFFOLD) SGD.

    Each step draws ``min(batch_size, M)`` distinct real rows uniformly (:func:`sample_batch`),
    takes the mean loss over them and updates ``y``; FedProx adds ``mu (y - x)`` to the gradient
    (Li et al. 2020, arXiv:1812.06127), SCAFFOLD adds ``c - c_k`` and returns option II's control
    delta (Karimireddy et al. 2020, arXiv:1910.06378). The returned delta is ``y_S - x``.

    Local DP-SGD (Abadi et al. 2016, arXiv:1607.00133), when ``dp_clip_norm`` is set: each step
    Poisson-samples the client's real rows, each independently with rate ``q = L / n`` where
    ``n`` is the client's number of examples and ``L = min(batch_size, n)`` the expected batch
    (:func:`poisson_rows`); the sampled rows are processed in chunks of
    :func:`poisson_chunk_size` rows (a batch larger than one chunk gets further chunks, never
    truncated); each row's gradient is clipped to L2 norm ``C`` and summed (padding adds exactly
    zero), ``N(0, sigma^2 C^2 I)`` is added once with a key derived from the step key (never the
    key that drew the batch), the sum is divided by ``L`` (public; never the realised size) and
    the optimizer applied; FedProx's ``mu (y - x)`` is added after the noise (it reads no data).
    SCAFFOLD is refused: its control variates are data-dependent and not privatised.

    Guarantees (local DP-SGD): each local step is the Poisson-subsampled Gaussian mechanism on
    the client's ``n`` examples under add/remove-one neighbours (sensitivity ``C``), accounted by
    ``accounting.dpsgd_event(sigma, L / n, steps)``; the per-site epsilon over all its local
    steps is :func:`local_dp_epsilon`. The delta and everything computed from it are
    post-processing; the reported ``loss`` is not privatised.

    Args:
      apply_fn: ``apply(params, images) -> logits`` (``Model.apply``).
      task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
      local_steps: number of local steps ``S``.
      batch_size: examples per local step (capped at the padded client length ``M``).
      client_lr: local learning rate ``lr``.
      client_optimizer: ``"sgd"`` or an optax transformation (initialised afresh each round).
      prox_mu: FedProx ``mu`` (0 = FedAvg).
      scaffold: whether to apply SCAFFOLD's correction (requires ``"sgd"``).
      unroll: ``lax.scan`` unroll of the local loop; ``None`` = :func:`default_unroll`.
      dp_clip_norm: local DP-SGD clipping norm ``C > 0`` (``math.inf``: no clipping, only with
        zero noise); ``None`` turns local DP-SGD off.
      dp_noise_multiplier: local DP-SGD ``sigma >= 0``; the noise stddev is ``sigma C``.

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
    )


def _check_dp(dp_clip_norm: float | None, dp_noise_multiplier: float, scaffold: bool) -> None:
    if not dp_noise_multiplier >= 0:
        raise ValueError(f"{dp_noise_multiplier=} must be >= 0")
    if dp_clip_norm is None:
        if dp_noise_multiplier:
            raise ValueError(
                f"{dp_noise_multiplier=} > 0 needs dp_clip_norm (the noise is sigma C)"
            )
        return
    if not dp_clip_norm > 0:
        raise ValueError(f"{dp_clip_norm=} must be > 0 (or None to turn local DP-SGD off)")
    if dp_noise_multiplier and dp_clip_norm == float("inf"):
        raise ValueError(f"{dp_clip_norm=} must be finite when dp_noise_multiplier > 0")
    if scaffold:
        raise ValueError(
            "scaffold=True cannot be combined with local DP-SGD (dp_clip_norm): SCAFFOLD's "
            "control variates are data-dependent and not privatised"
        )


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
    ``N(0, sigma^2 C^2 I)`` to their clipped sum (Abadi et al. 2016, arXiv:1607.00133). This is
    ``accounting.dpsgd_event(sigma, q, steps)`` (Poisson, add/remove-one neighbours,
    sensitivity ``C``) evaluated by ``accounting.epsilon``.

    Args:
      noise_multiplier: ``sigma >= 0`` (``dp_noise_multiplier``); ``0`` gives ``inf``.
      batch_size: the ``batch_size`` of the local update (``B``).
      num_examples: the site's number of real examples ``n >= 1``.
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
