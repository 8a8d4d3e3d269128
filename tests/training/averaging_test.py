"""Parameter averages: the raw trajectory is untouched and the averages follow their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_med.training import averaging


def _trajectory(tx, steps=6):
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    state = tx.init(params)
    out = [params]
    for t in range(steps):
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out, state


def test_averages_leave_the_raw_parameters_bit_identical_and_follow_the_formulas():
    raw, _ = _trajectory(optax.sgd(0.3, momentum=0.9))
    tx = averaging.with_averages(optax.sgd(0.3, momentum=0.9), ema_decay=0.8, polyak_start=2)
    averaged, state = _trajectory(tx)
    for a, b in zip(raw, averaged, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    # The formulas, by a loop over the iterates theta_0..theta_6.
    ema = raw[0]
    for t in range(1, len(raw)):
        d = min(0.8, (1 + t) / (10 + t))
        ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, raw[t])
    polyak = jax.tree.map(lambda *p: sum(p) / len(p), *raw[3:])  # theta_3..theta_6
    got = averaging.averaged_params(state)
    for name, expected in (("ema", ema), ("polyak", polyak)):
        for x, y in zip(jax.tree.leaves(got[name]), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6)


def test_off_is_the_plain_optimizer_and_bad_values_are_refused():
    tx = optax.sgd(0.1)
    assert averaging.with_averages(tx, 0.0, -1) is tx
    assert averaging.averaged_params(tx.init({"w": jnp.zeros(2)})) == {}
    with pytest.raises(ValueError, match=r"train.ema_decay=1.0 must be in \[0, 1\)"):
        averaging.parameter_averages(1.0)
    with pytest.raises(ValueError, match=r"train.polyak_start=-2 must be >= -1"):
        averaging.parameter_averages(0.0, -2)
