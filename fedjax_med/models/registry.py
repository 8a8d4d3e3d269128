"""Models selected by name, wrapped as a pure ``(init, apply)`` pair over a params pytree.

A factory registered with :func:`register` builds a ``flax.linen`` module from ``num_outputs`` and
its own keyword arguments; :func:`get_model` binds it to an input shape and returns a
:class:`Model`. Every registered model is deterministic and keeps no state besides its
parameters (no BatchNorm statistics, no dropout), so ``apply(params, images)`` is a pure function
whose output for one example does not depend on the other examples of the batch. That property
is what lets the privacy code compute per-example gradients with ``jax.vmap`` over single
examples, and the federated code ``jax.vmap`` over clients.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Mapping[str, Any]
Factory = Callable[..., nn.Module]

# A top-level module of this name holds statistics of the training data that the trainer sets
# before step 0 (ScatterNet's private DataNorm) and never trains.
DATA_STATS = "data_stats"

_FACTORIES: dict[str, Factory] = {}
_MIN_SIZES: dict[str, int] = {}
# Spatial dimensions of one example a model takes: 2 for images (H, W, C), 3 for volumes
# (D, H, W, C).
_SPATIAL_DIMS: dict[str, int] = {}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "tanh": nn.tanh}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation={name!r} must be one of {tuple(ACTIVATIONS)}") from None


def kernel_init(activation: str) -> nn.initializers.Initializer:
    """Fan-in scaled normal init matched to the activation that follows the layer.

    He normal (variance 2 / fan_in) for ReLU, arXiv:1502.01852; LeCun normal (variance 1 / fan_in)
    for tanh, whose gain near zero is 1.
    """
    get_activation(activation)
    if activation == "relu":
        return nn.initializers.he_normal()
    return nn.initializers.lecun_normal()


def _init_variables(module: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> Params:
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    if isinstance(rng, jax.core.Tracer):  # under jit / vmap: let the caller's transform compile it
        return module.init(rng, dummy)
    rng = jnp.asarray(rng)
    return _compiled_init(module, tuple(input_shape), tuple(rng.shape), rng.dtype)(rng)


@functools.lru_cache(maxsize=32)
def _compiled_init(
    module: nn.Module, input_shape: tuple[int, ...], rng_shape: tuple[int, ...], rng_dtype: Any
) -> Callable[[jax.Array], Params]:
    """Init compiled once per (module, shape, key type), without backend optimisation.

    Init runs once per model, so optimising its code is wasted: on CPU, XLA's default
    optimisation makes compiling a ResNet's initializers take seconds, about 5x longer than at
    level 0, while the parameters agree with an optimised build up to float rounding.
    """
    lowered = jax.jit(lambda rng: module.init(rng, jnp.zeros((1, *input_shape), jnp.float32)))
    lowered = lowered.lower(jax.ShapeDtypeStruct(rng_shape, rng_dtype))
    try:
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    except jax.errors.JaxRuntimeError:  # a backend without that option
        return lowered.compile()


# Models already built, by (name, input_shape, num_outputs, options). A model is immutable, so
# every run of one spec in a process shares one object, and with it every program compiled for
# its ``apply`` (jitted functions and the caches keyed on ``apply`` see the same function).
_BUILT: dict[tuple, Model] = {}


@dataclasses.dataclass(frozen=True)
class Model:
    """A flax module bound to the shape of one example, used as pure ``init`` / ``apply``.

    Attributes:
      name: the registered name the model was built from.
      module: the ``flax.linen`` module; it has no collections besides ``params``.
      input_shape: ``(H, W, C)`` of one image or ``(D, H, W, C)`` of one volume.
      num_outputs: number of logits per example (1 for binary, K for K classes or labels).
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    num_outputs: int

    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters: the ``params`` collection as a plain nested dict.

        Args:
          rng: a PRNG key; the same key always gives the same parameters.
        """
        variables = _init_variables(self.module, rng, self.input_shape)
        extra = sorted(set(variables) - {"params"})
        if extra:
            # A second collection (e.g. BatchNorm's batch_stats) would make apply impure and mix
            # examples, which breaks per-example privacy.
            raise ValueError(f"model {self.name!r} has collections {extra} besides 'params'")
        return flax.core.unfreeze(variables["params"])

    def apply(self, params: Params, images: jax.Array) -> jax.Array:
        """Logits ``(B, num_outputs)`` for float images ``(B, H, W, C)`` or ``(B, D, H, W, C)``.

        Args:
          params: a pytree as returned by :meth:`init`.
          images: normalised float images whose trailing shape is ``input_shape``; ``B`` may be 1,
            e.g. a single example under ``jax.vmap``.
        """
        images = jnp.asarray(images)
        if images.ndim != len(self.input_shape) + 1 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"images.shape={tuple(images.shape)} must be (batch, *{self.input_shape}) "
                f"for model {self.name!r}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images.dtype={images.dtype} must be floating; normalise first")
        return self.module.apply({"params": params}, images)

    def num_params(self, params: Params) -> int:
        """Total number of scalars in ``params``."""
        return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))


def register(
    name: str, *, min_size: int = 1, spatial_dims: int = 2
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(num_outputs, **kwargs) -> nn.Module`` under ``name``.

    Args:
      name: the name :func:`get_model` will accept; must not be taken.
      min_size: smallest input height and width (and depth) the architecture supports.
      spatial_dims: 2 for a model of images ``(H, W, C)``, 3 for one of volumes ``(D, H, W, C)``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"{spatial_dims=} must be 2 (images) or 3 (volumes)")

    def decorator(factory: Factory) -> Factory:
        if name in _FACTORIES:
            raise ValueError(f"model name {name!r} is already registered")
        _FACTORIES[name] = factory
        _MIN_SIZES[name] = min_size
        _SPATIAL_DIMS[name] = spatial_dims
        return factory

    return decorator


def available_models() -> tuple[str, ...]:
    """Registered model names, sorted."""
    return tuple(sorted(_FACTORIES))


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple | list):
        if not isinstance(value, tuple | list):
            return False
        return not default or all(_same_kind(v, default[0]) for v in value)
    return True  # no default, or None: the factory checks it


def _check_kwarg(name: str, key: str, value: Any, default: Any) -> None:
    """Refuses a ``model.kwargs`` value whose type differs from the factory's default's."""
    if default is inspect.Parameter.empty or _same_kind(value, default):
        return
    kind = type(default).__name__
    if isinstance(default, tuple | list) and default:
        kind += f" of {type(default[0]).__name__}"
    raise ValueError(
        f"config field 'model.kwargs.{key}'={value!r} of model {name!r} must be like its "
        f"default {default!r} ({kind})"
    )


def get_model(
    name: str, *, input_shape: tuple[int, ...], num_outputs: int, **kwargs: Any
) -> Model:
    """Builds the registered model ``name`` for examples of shape ``input_shape``.

    Args:
      name: one of :func:`available_models`.
      input_shape: ``(H, W, C)`` of one image, or ``(D, H, W, C)`` of one volume for a model
        registered with ``spatial_dims=3``.
      num_outputs: logits per example: 1 for binary, K for K classes or K labels.
      **kwargs: architecture options accepted by the model's factory (e.g. ``width``).

    Returns:
      A :class:`Model`.

    Raises:
      ValueError: for an unknown name or keyword argument, or a shape the model cannot take.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fedjax_med import models
      >>> model = models.get_model("small_cnn", input_shape=(28, 28, 1), num_outputs=10)
      >>> params = model.init(jax.random.key(0))
      >>> model.num_params(params)
      26010
      >>> model.apply(params, jnp.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; registered models: {available_models()}")
    factory = _FACTORIES[name]
    parameters = inspect.signature(factory).parameters
    accepted = [p for p in parameters if p != "num_outputs"]
    for key, value in kwargs.items():
        if key not in accepted:
            raise ValueError(
                f"unknown argument {key!r} for model {name!r}; accepted: {tuple(accepted)}"
            )
        _check_kwarg(name, key, value, parameters[key].default)
    input_shape = tuple(int(d) for d in input_shape)
    dims = _SPATIAL_DIMS[name]
    layout = "(H, W, C)" if dims == 2 else "(D, H, W, C)"
    if len(input_shape) != dims + 1 or min(input_shape) < 1:
        volumes = [m for m in available_models() if _SPATIAL_DIMS[m] == 3]
        kind = (
            f"3-D volumes need a volume model ({', '.join(volumes)})"
            if len(input_shape) == 4
            else "2-D images need an image model"
        )
        raise ValueError(
            f"input_shape={input_shape}: model {name!r} (config field 'model.name') takes "
            f"examples {layout} with positive sizes; {kind}"
        )
    min_size = _MIN_SIZES[name]
    if min(input_shape[:dims]) < min_size:
        sides = "H and W" if dims == 2 else "D, H and W"
        raise ValueError(f"input_shape={input_shape}: model {name!r} needs {sides} >= {min_size}")
    if isinstance(num_outputs, bool) or int(num_outputs) != num_outputs or num_outputs < 1:
        raise ValueError(f"num_outputs={num_outputs!r} must be a positive integer")
    spec = (name, input_shape, int(num_outputs), tuple(sorted(kwargs.items())))
    try:
        return _BUILT[spec]
    except KeyError:
        pass
    except TypeError:  # an unhashable option: build a model of its own
        spec = None
    module = factory(int(num_outputs), **kwargs)
    model = Model(name=name, module=module, input_shape=input_shape, num_outputs=int(num_outputs))
    if spec is not None:
        _BUILT[spec] = model
    return model
