"""Pytrees of JAX arrays as Flower ``ArrayRecord`` s of NumPy arrays, checked on the way in.

A pytree travels as one :class:`flwr.app.ArrayRecord` whose keys are the leaves' key paths
(``jax.tree_util.keystr``, e.g. ``"['params']['Dense_0']['kernel']"``) in flattening order and
whose values are :class:`flwr.app.Array` s made from NumPy arrays (Flower's own serialisation of
``numpy.ndarray``; nothing passes through PyTorch). The receiver rebuilds the tree against a
template it already holds (its copy of the model), so a sender cannot change the structure:
a missing or extra leaf, a wrong shape or dtype, or a non-finite value raises
:class:`MalformedUpdate` naming the leaf, which the server turns into an excluded client.

PRNG keys (typed or raw ``uint32``) travel as their ``key_data``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.deploy import flower


class MalformedUpdate(ValueError):
    """A received record does not match the tree it must fill (structure, shape, dtype, NaN)."""


def _paths(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def to_record(tree: Any) -> Any:
    """``tree`` as an ``ArrayRecord`` of NumPy arrays keyed by key path.

    Examples:
      >>> record = to_record({"w": np.ones((2, 3), np.float32)})
      >>> list(record.keys()), record["['w']"].shape
      (["['w']"], (2, 3))
    """
    fl = flower.require()
    arrays = {name: fl.app.Array(np.asarray(leaf)) for name, leaf in _paths(tree)}
    return fl.app.ArrayRecord(arrays)


def from_record(record: Any, template: Any, *, what: str, finite: bool = True) -> Any:
    """The tree of ``template``'s structure filled from ``record``, every leaf checked.

    Args:
      record: an ``ArrayRecord`` made by :func:`to_record`.
      template: a pytree of arrays (or ``jax.ShapeDtypeStruct``) with the expected structure.
      what: the record's name in error messages (``"delta"``, ``"params"``).
      finite: also refuse NaN and infinite values.

    Raises:
      MalformedUpdate: naming the first leaf whose key, shape, dtype or values are wrong.
    """
    expected = _paths(template)
    names = [name for name, _ in expected]
    if list(record.keys()) != names:
        missing = sorted(set(names) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(names))
        raise MalformedUpdate(
            f"{what}: leaves {list(record.keys())[:4]}... do not match the model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    leaves = []
    for name, leaf in expected:
        value = record[name].numpy()
        shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
        if value.shape != shape or value.dtype != dtype:
            raise MalformedUpdate(
                f"{what}{name}: shape {value.shape} dtype {value.dtype}, expected {shape} {dtype}"
            )
        if finite and np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(value)):
            raise MalformedUpdate(f"{what}{name}: non-finite values")
        leaves.append(jnp.asarray(value))
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def key_to_array(key: jax.Array) -> tuple[np.ndarray, bool]:
    """``(key_data as uint32, typed)`` of a PRNG key, to send it."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(key) if typed else key, np.uint32), bool(typed)


def array_to_key(data: np.ndarray, typed: bool) -> jax.Array:
    """Inverse of :func:`key_to_array` (the default threefry implementation)."""
    data = jnp.asarray(np.asarray(data, np.uint32))
    return jax.random.wrap_key_data(data) if typed else data
