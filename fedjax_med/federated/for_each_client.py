"""Run one client's local update for every client of a cohort: vmap, sharded and loop backends.

A cohort is a fixed number ``C`` of client slots, padded with a ``client_mask`` (see
``sampling.Cohort``), so every round has the same shapes and the round compiles once. The traced
backends compute ``local_update`` for every slot, padding included; the loop backend skips the
masked ones. Aggregation gives padding slots weight zero.

Backends (the names of :data:`BACKENDS`):

* ``"vmap"``: ``jax.vmap`` over the client axis; with ``chunk_size`` the cohort is cut into
  chunks of ``chunk_size`` clients run one after another by ``lax.map``, which bounds the memory
  of the vmapped activations to one chunk. (On CPU the ``lax.map`` loop costs the same ~4x per
  step as a rolled local loop, see ``client.default_unroll``; there, prefer ``"loop"``.)
* ``"sharded"``: the client axis split over a 1-D ``jax.sharding.Mesh`` axis named ``clients``
  (``NamedSharding(mesh, P("clients"))``) with ``jax.shard_map``; each device runs the ``"vmap"``
  backend on its own clients. Parameters are replicated.
* ``"loop"``: a Python loop calling a jitted single-client update, one client at a time. The
  debugging backend (errors name the client) and the baseline of the benchmark. It cannot be
  traced inside ``jax.jit``.
* ``"auto"``: per platform (:func:`auto_backend`): ``"loop"`` on CPU, where vmap measured
  slower (``benchmarks/RESULTS.md``, "Federated"); ``"vmap"`` on one GPU/TPU; ``"sharded"``
  over several.

The stacked per-client outputs are the same pytree as one client's output with a leading ``C``
axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fedjax_med.federated import client as client_lib

BACKENDS = ("auto", "vmap", "sharded", "loop")
CLIENT_AXIS = "clients"


def auto_backend(devices: list[jax.Device] | None = None) -> str:
    """The backend ``"auto"`` resolves to on ``devices`` (default: all local devices).

    CPU: ``"loop"``. On XLA:CPU a vmapped cohort turns each client's layers into batched matmuls
    and grouped convolutions, which ran 1.3-2.8x slower than the same clients one by one (small
    CNN and MLP, 8 and 64 clients; ``python benchmarks/federated.py --unroll``), and 7.5x slower
    at 64 clients once the small CNN's pooling stopped using select-and-scatter
    (``benchmarks/RESULTS.md``, "Federated"). GPU/TPU:
    ``"sharded"`` over several devices, else ``"vmap"`` (one program for the whole cohort).
    """
    devices = jax.local_devices() if devices is None else devices
    if devices[0].platform == "cpu":
        return "loop"
    return "sharded" if len(devices) > 1 else "vmap"


def client_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``clients`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), (CLIENT_AXIS,))


def _pad_leading(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pads every leaf's axis 0 up to a multiple of ``multiple`` by repeating row 0."""
    size = jax.tree.leaves(tree)[0].shape[0]
    padded = -(-size // multiple) * multiple
    if padded == size:
        return tree, size

    def pad(x):
        filler = jnp.broadcast_to(x[:1], (padded - size, *x.shape[1:]))
        return jnp.concatenate([x, filler], axis=0)

    return jax.tree.map(pad, tree), size


def chunked_vmap(fn, chunk_size: int | None):
    """``vmap(fn)`` over axis 0 of ``batched``, ``chunk_size`` rows at a time via ``lax.map``.

    ``fn(shared, batched_row)``; ``shared`` is broadcast. ``None`` or a chunk at least as large as
    the batch gives one plain vmap.
    """
    vmapped = jax.vmap(fn, in_axes=(None, 0))

    def run(shared, batched):
        size = jax.tree.leaves(batched)[0].shape[0]
        if chunk_size is None or chunk_size >= size:
            return vmapped(shared, batched)
        padded, size = _pad_leading(batched, chunk_size)
        chunks = jax.tree.map(lambda x: x.reshape(-1, chunk_size, *x.shape[1:]), padded)
        out = jax.lax.map(lambda chunk: vmapped(shared, chunk), chunks)
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:size], out)

    return run


@dataclasses.dataclass(frozen=True)
class ForEachClient:
    """Runs a :class:`~fedjax_med.federated.client.LocalUpdate` over a cohort (see module doc).

    Call as ``for_each(global_params, images, labels, mask, counts, keys, server_control=None,
    client_controls=None, client_mask=None, unit_ids=None, site_params=None)`` with per-client
    arrays of leading size ``C`` (``images``: ``(C, M, ...)``, ``counts``: ``(C,)``, ``keys``:
    ``(C, ...)``, ``client_controls``: params with a leading ``C``; ``unit_ids``: ``(C, M)``
    patient of each row, for patient-level local DP-SGD; ``site_params``: each site's own
    parameters with a leading ``C``, for FedBN and Ditto). ``client_mask`` marks the slots whose
    output will be used; the loop backend skips the others (their outputs are zeros), the
    traced backends compute every slot. Returns a
    :class:`~fedjax_med.federated.client.ClientOutput` whose leaves have a leading ``C`` axis.

    Attributes:
      local_update: the single-client function.
      backend: ``"vmap"``, ``"sharded"`` or ``"loop"`` (``"auto"`` already resolved).
      chunk_size: clients per vmapped chunk (per device for ``"sharded"``); ``None`` = all.
      mesh: the ``clients`` mesh of the sharded backend.
    """

    local_update: client_lib.LocalUpdate
    backend: str
    chunk_size: int | None = None
    mesh: Mesh | None = None
    # The loop backend's compiled single-client function, built once and reused across rounds.
    _jitted: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_jitted", jax.jit(self._single))

    @property
    def traceable(self) -> bool:
        """Whether the call can run inside ``jax.jit`` (all backends but ``"loop"``)."""
        return self.backend != "loop"

    def _single(self, shared, row):
        params, server_control = shared
        images, labels, mask, count, key, client_control, unit_ids, site_params = row
        return self.local_update(
            params,
            images,
            labels,
            mask,
            count,
            key,
            server_control,
            client_control,
            unit_ids,
            site_params=site_params,
        )

    def __call__(
        self,
        global_params,
        images,
        labels,
        mask,
        counts,
        keys,
        server_control=None,
        client_controls=None,
        client_mask=None,
        unit_ids=None,
        site_params=None,
    ) -> client_lib.ClientOutput:
        shared = (global_params, server_control)
        batched = (images, labels, mask, counts, keys, client_controls, unit_ids, site_params)
        if self.backend == "vmap":
            return chunked_vmap(self._single, self.chunk_size)(shared, batched)
        if self.backend == "sharded":
            return self._sharded(shared, batched)
        return self._loop(shared, batched, client_mask)

    def _sharded(self, shared, batched):
        num_devices = self.mesh.shape[CLIENT_AXIS]
        padded, size = _pad_leading(batched, num_devices)
        per_device = chunked_vmap(self._single, self.chunk_size)

        def local(shared, batched):
            # Mark the replicated inputs as varying over devices: differentiating an unvarying
            # input inside shard_map would psum its cotangent, i.e. add every device's client
            # gradients together.
            shared = jax.tree.map(lambda x: jax.lax.pcast(x, CLIENT_AXIS, to="varying"), shared)
            return per_device(shared, batched)

        run = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(P(), P(CLIENT_AXIS)),
            out_specs=P(CLIENT_AXIS),
        )
        out = run(shared, padded)
        return jax.tree.map(lambda x: x[:size], out)

    def _loop(self, shared, batched, client_mask):
        size = jax.tree.leaves(batched)[0].shape[0]
        run = np.ones(size, bool) if client_mask is None else np.asarray(client_mask, bool)
        rows = _unstack(batched)
        skipped = None
        outputs = []
        for i, row in enumerate(rows):
            if not run[i]:
                # A slot nobody reads (padding, dropped client): zeros of the right shape.
                if skipped is None:
                    shapes = jax.eval_shape(self._single, shared, row)
                    skipped = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                outputs.append(skipped)
                continue
            try:
                outputs.append(self._jitted(shared, row))
            except Exception as e:
                raise RuntimeError(f"local_update failed for client slot {i}: {e}") from e
        return _stack(outputs)


# One dispatch each for cutting the cohort into client rows and stacking the clients' outputs:
# indexing every leaf per client (and jnp.stack's per-array expand_dims) dispatched about ten
# small ops per client, which cost the loop a quarter of its speed on a small CNN
# (benchmarks/RESULTS.md, "Federated"). Traced once per cohort size and pytree structure.
@jax.jit
def _unstack(tree):
    size = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(size)]


@jax.jit
def _stack(outputs):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


def for_each_client(
    local_update: client_lib.LocalUpdate,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> ForEachClient:
    """Builds the cohort runner of ``local_update`` on the named backend.

    Args:
      local_update: one client's update (:func:`~fedjax_med.federated.client.make_local_update`).
      backend: one of :data:`BACKENDS`.
      chunk_size: clients vmapped together (per device for ``"sharded"``); ``None`` = the whole
        (per-device) cohort. Smaller chunks bound memory at some speed cost.
      mesh: for ``"sharded"``: a mesh with a ``clients`` axis; default :func:`client_mesh`.

    Returns:
      A :class:`ForEachClient`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> quadratic = lambda p, x, y: 0.5 * jnp.sum((p - x) ** 2, axis=-1)
      >>> update = client_lib.make_local_update_for_loss(
      ...     quadratic, local_steps=1, batch_size=1, client_lr=1.0)
      >>> run = for_each_client(update, backend="vmap")
      >>> out = run(jnp.zeros(1), jnp.array([[[1.0]], [[3.0]]]), jnp.zeros((2, 1)),
      ...           jnp.ones((2, 1), bool), jnp.array([1, 1]), jax.random.split(jax.random.key(0)))
      >>> out.delta[:, 0].tolist()
      [1.0, 3.0]
    """
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1
    ):
        raise ValueError(f"{chunk_size=} must be a positive integer or None")
    if backend == "auto":
        backend = auto_backend()
    if backend == "sharded":
        mesh = client_mesh() if mesh is None else mesh
        if CLIENT_AXIS not in mesh.shape or len(mesh.shape) != 1:
            raise ValueError(f"mesh axes {tuple(mesh.shape)} must be exactly ({CLIENT_AXIS!r},)")
    elif mesh is not None:
        raise ValueError(f"mesh is only used by backend='sharded', not {backend=}")
    return ForEachClient(local_update, backend, chunk_size, mesh)
