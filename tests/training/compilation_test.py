"""Compiling without XLA's optimisation passes: same numbers, and the setting is restored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.training import compilation


def _program(x):
    return jnp.tanh(x @ x.T).sum(axis=0) * 0.5 + jnp.exp(-x).mean()


def test_fast_compile_gives_the_same_numbers_and_restores_the_flag():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
    before = jax.config.read("jax_disable_most_optimizations")
    optimized = jax.jit(_program)(x)
    with compilation.xla_optimizations(False):
        assert jax.config.read("jax_disable_most_optimizations") is True
        fast = jax.jit(lambda v: _program(v))(x)  # a fresh program, compiled in this mode
    assert jax.config.read("jax_disable_most_optimizations") == before
    np.testing.assert_allclose(np.asarray(fast), np.asarray(optimized), rtol=1e-5, atol=1e-6)


def test_the_flag_is_restored_after_an_error():
    before = jax.config.read("jax_disable_most_optimizations")
    with pytest.raises(RuntimeError), compilation.xla_optimizations(False):
        raise RuntimeError("inside")
    assert jax.config.read("jax_disable_most_optimizations") == before
