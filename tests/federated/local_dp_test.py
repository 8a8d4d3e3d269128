"""Local DP-SGD inside a client's update: clipping, noise scale and keys, padding, accounting."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp

from fedjax_med.federated import client
from fedjax_med.privacy import accounting


def quadratic_loss(params, x, y):
    """0.5 ||w - x||^2 per example: the per-example gradient is w - x."""
    del y
    return 0.5 * jnp.sum((params["w"] - x) ** 2, axis=-1)


def zero_grad_loss(params, x, y):
    """A loss whose gradient is exactly zero: the update is pure noise."""
    del y
    return 0.0 * jnp.sum(params["w"] * x, axis=-1)


def _client(n, m, dim=3, seed=0, padding_value=0.0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(m, dim)).astype(np.float32)
    images[n:] = padding_value
    mask = np.arange(m) < n
    return jnp.asarray(images), jnp.zeros(m, jnp.int32), jnp.asarray(mask), n


def _update(**kwargs):
    defaults = dict(local_steps=1, batch_size=4, client_lr=0.1)
    loss_fn = kwargs.pop("loss_fn", quadratic_loss)
    return client.make_local_update_for_loss(loss_fn, **{**defaults, **kwargs})


def _run(update, data, key, w=None):
    images, labels, mask, n = data
    params = {"w": jnp.zeros(images.shape[1]) if w is None else w}
    return jax.jit(update)(params, images, labels, mask, n, key)


@pytest.mark.parametrize("prox_mu", [0.0, 0.3])
def test_no_clip_no_noise_equals_the_plain_update(prox_mu):
    # batch_size >= n: Poisson rate 1 takes every real row, as the plain update does.
    data = _client(n=6, m=8)
    kw = dict(local_steps=4, batch_size=8, client_lr=0.2, prox_mu=prox_mu)
    plain = _run(_update(**kw), data, jax.random.key(3))
    dp = _run(
        _update(**kw, dp_clip_norm=math.inf, dp_noise_multiplier=0.0), data, jax.random.key(3)
    )
    np.testing.assert_allclose(dp.delta["w"], plain.delta["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dp.loss, plain.loss, rtol=1e-6)


def test_no_clip_no_noise_equals_the_plain_update_for_a_model(mlp, make_clients):
    model, params = mlp
    data = make_clients([5], max_examples=7)
    kw = dict(local_steps=2, batch_size=7, client_lr=0.3)
    args = (params, data.images[0], data.labels[0], data.mask[0], 5, jax.random.key(1))
    plain = client.make_local_update(model.apply, "multiclass", **kw)(*args)
    dp = client.make_local_update(model.apply, "multiclass", **kw, dp_clip_norm=math.inf)(*args)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), dp.delta, plain.delta
    )
    np.testing.assert_allclose(dp.loss, plain.loss, rtol=1e-6)


def test_one_clipped_step_moves_at_most_lr_times_clip_norm():
    lr, clip = 0.1, 0.5
    images = jnp.full((6, 3), 1e6)  # every gradient w - x is huge and points the same way
    data = (images, jnp.zeros(6, jnp.int32), jnp.ones(6, bool), 6)
    out = _run(_update(client_lr=lr, dp_clip_norm=clip), data, jax.random.key(0))
    norm = float(jnp.linalg.norm(out.delta["w"]))
    assert norm <= lr * clip * (1 + 1e-5)
    np.testing.assert_allclose(norm, lr * clip, rtol=1e-5)  # aligned: the mean keeps norm C


def test_noise_changes_the_update_and_is_a_function_of_the_key():
    data = _client(n=6, m=6)
    kw = dict(local_steps=3, dp_clip_norm=1.0)
    quiet = _run(_update(**kw), data, jax.random.key(0))
    noisy = _update(**kw, dp_noise_multiplier=1.0)
    a = _run(noisy, data, jax.random.key(0))
    b = _run(noisy, data, jax.random.key(0))
    c = _run(noisy, data, jax.random.key(1))
    assert not np.allclose(a.delta["w"], quiet.delta["w"])
    np.testing.assert_array_equal(a.delta["w"], b.delta["w"])
    assert not np.allclose(a.delta["w"], c.delta["w"])


def test_noise_scales_exactly_with_the_noise_multiplier():
    data = _client(n=5, m=5)
    kw = dict(loss_fn=zero_grad_loss, dp_clip_norm=2.0)
    unit = _run(_update(**kw, dp_noise_multiplier=1.0), data, jax.random.key(7)).delta["w"]
    triple = _run(_update(**kw, dp_noise_multiplier=3.0), data, jax.random.key(7)).delta["w"]
    np.testing.assert_allclose(triple, 3.0 * unit, rtol=1e-6)


def test_noise_std_is_sigma_clip_over_batch_times_lr():
    sigma, clip, batch, lr, dim = 1.5, 2.0, 4, 0.1, 16
    update = _update(
        loss_fn=zero_grad_loss,
        batch_size=batch,
        client_lr=lr,
        dp_clip_norm=clip,
        dp_noise_multiplier=sigma,
    )
    images, labels, mask, n = _client(n=6, m=6, dim=dim)
    params = {"w": jnp.zeros(dim)}
    keys = jax.random.split(jax.random.key(0), 500)
    run = jax.jit(jax.vmap(lambda k: update(params, images, labels, mask, n, k).delta["w"]))
    samples = np.asarray(run(keys)).ravel()
    expected = sigma * clip / batch * lr
    np.testing.assert_allclose(samples.std(), expected, rtol=0.1)
    assert abs(samples.mean()) < 0.05 * expected


def test_padding_rows_contribute_nothing():
    # 3 real rows and an expected batch of 5 > 3: rate 1, every step takes all real rows.
    kw = dict(local_steps=2, batch_size=5, client_lr=0.1, dp_clip_norm=10.0)
    zeros = _client(n=3, m=5, padding_value=0.0)
    garbage = _client(n=3, m=5, padding_value=np.nan)
    for sigma in (0.0, 1.0):
        update = _update(**kw, dp_noise_multiplier=sigma)
        a = _run(update, zeros, jax.random.key(2))
        b = _run(update, garbage, jax.random.key(2))
        np.testing.assert_array_equal(a.delta["w"], b.delta["w"])
        assert np.isfinite(b.loss)
    # Closed form without noise: y <- y - lr * sum_real(y - x_i) / L, L = min(B, n) = 3.
    out = _run(_update(**kw), zeros, jax.random.key(2))
    x, y = np.asarray(zeros[0][:3]), np.zeros(3)
    for _ in range(2):
        y = y - 0.1 * (y - x).sum(0) / 3
    np.testing.assert_allclose(out.delta["w"], y, rtol=1e-5, atol=1e-7)


def _direct_epsilon(sigma, batch, n, steps, delta):
    q = min(batch, n) / n
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = rdp.RdpAccountant(list(accounting.RDP_ORDERS))
    acc.compose(event)
    return acc.get_epsilon(delta)


def test_poisson_rows_have_rate_q():
    mask = jnp.arange(100) < 80
    keys = jax.random.split(jax.random.key(5), 400)
    realised = np.asarray(jax.vmap(lambda k: client.poisson_rows(k, mask, 0.25)[1])(keys))
    # Binomial(80, 0.25): mean 20; the mean of 400 draws has sd ~0.19.
    assert abs(realised.mean() - 20.0) < 1.0
    order, count = client.poisson_rows(jax.random.key(1), mask, 0.5)
    assert bool(jnp.all(mask[order[: int(count)]]))  # sampled rows are real and come first


def test_batch_larger_than_a_chunk_is_not_truncated(monkeypatch):
    # Rate 1 (batch_size >= n) samples all 40 rows; chunks of 7 rows need 6 chunks.
    monkeypatch.setattr(client, "poisson_chunk_size", lambda expected: 7)
    data = _client(n=40, m=40)
    out = _run(
        _update(batch_size=40, client_lr=1.0, dp_clip_norm=math.inf), data, jax.random.key(0)
    )
    expected = np.asarray(data[0]).mean(0)  # one step from w = 0: -lr * mean(w - x) = mean(x)
    np.testing.assert_allclose(out.delta["w"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,n", [(10, 200), (32, 20)])
def test_local_dp_epsilon_equals_dp_accounting_and_grows_with_steps(batch, n):
    sigma, delta = 1.2, 1e-5
    eps = [client.local_dp_epsilon(sigma, batch, n, steps, delta) for steps in (0, 50, 100)]
    assert eps[0] == 0.0
    assert 0 < eps[1] < eps[2]
    np.testing.assert_allclose(eps[2], _direct_epsilon(sigma, batch, n, 100, delta), rtol=1e-9)


def test_invalid_dp_settings_raise():
    with pytest.raises(ValueError, match="scaffold"):
        _update(scaffold=True, dp_clip_norm=1.0)
    with pytest.raises(ValueError, match="dp_clip_norm"):
        _update(dp_clip_norm=0.0)
    with pytest.raises(ValueError, match="dp_noise_multiplier"):
        _update(dp_clip_norm=1.0, dp_noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="needs dp_clip_norm"):
        _update(dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="finite"):
        _update(dp_clip_norm=math.inf, dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="steps"):
        client.local_dp_epsilon(1.0, 4, 10, -1, 1e-5)
