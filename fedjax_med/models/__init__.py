"""Image classifiers and segmenters by name, used as pure ``(init, apply)`` over a params pytree.

>>> from fedjax_med import models
>>> models.available_models()  # doctest: +NORMALIZE_WHITESPACE
('cnn3d', 'cryptonets', 'linear', 'mlp', 'resnet_gn', 'scatter_cnn', 'scatter_linear',
 'small_cnn', 'unet', 'wide_resnet', 'wrn_16_4')

No model has BatchNorm or dropout: normalisation is GroupNorm (per example), so one example's
logits never depend on the rest of the batch and per-example gradients can be taken by
``jax.vmap`` (see :mod:`fedjax_med.models.registry`).
"""

# Importing the architecture modules registers their factories.
from fedjax_med.models import cnn, cnn3d, cryptonets, mlp, registry, resnet, scatternet, unet
from fedjax_med.models.registry import (
    Model,
    Params,
    available_models,
    get_activation,
    get_model,
    register,
)

__all__ = [
    "Model",
    "Params",
    "available_models",
    "cnn",
    "cnn3d",
    "cryptonets",
    "get_activation",
    "get_model",
    "mlp",
    "register",
    "registry",
    "resnet",
    "scatternet",
    "unet",
]
