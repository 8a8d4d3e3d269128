"""Local DP-SGD inside a client's update: clipping, noise scale and keys, padding, accounting."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import stats

from fedjax_med import randomness
from fedjax_med.federated import client
from fedjax_med.privacy import accounting, noise, sampling


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
    assert np.isnan(dp.loss) and np.isfinite(plain.loss)  # the loss is not released under DP


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
    assert np.isnan(dp.loss)


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
        assert np.all(np.isfinite(b.delta["w"]))
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


def test_batch_larger_than_a_chunk_is_not_truncated(monkeypatch):
    # Rate 1 (batch_size >= n) samples all 40 rows; chunks of 7 rows need 6 chunks.
    monkeypatch.setattr(sampling, "poisson_chunk_size", lambda expected: 7)
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


# ---- local DP-SGD calls the privacy primitives: unit, method, per-layer, microbatches, keys -----


def test_patient_level_clips_each_patient_once():
    # Patient 0: three images whose gradients point the same way (norm 1e3 each); patient 1: one
    # image in an orthogonal direction. Batch >= patients: rate 1, L = 2 patients.
    clip, lr = 1.0, 1.0
    images = jnp.array([[1e3, 0, 0], [1e3, 0, 0], [1e3, 0, 0], [0, 1e3, 0], [0, 0, 0]])
    mask = jnp.array([True, True, True, True, False])
    unit_ids = jnp.array([0, 0, 0, 1, -1])
    update = _update(
        batch_size=4, client_lr=lr, dp_clip_norm=clip, dp_unit="patient", dp_max_per_unit=3
    )
    out = jax.jit(update)(
        {"w": jnp.zeros(3)},
        images,
        jnp.zeros(5, jnp.int32),
        mask,
        4,
        jax.random.key(0),
        unit_ids=unit_ids,
    )
    # Each patient's summed gradient is clipped to C once: (C e0 + C e1) / 2, not (3C e0 + ...).
    np.testing.assert_allclose(out.delta["w"], [0.5, 0.5, 0.0], rtol=1e-5, atol=1e-6)
    example = _update(batch_size=4, client_lr=lr, dp_clip_norm=clip)
    per_example = jax.jit(example)(
        {"w": jnp.zeros(3)}, images, jnp.zeros(5, jnp.int32), mask, 4, jax.random.key(0)
    )
    np.testing.assert_allclose(per_example.delta["w"], [0.75, 0.25, 0.0], rtol=1e-5)


def test_patient_contribution_is_at_most_c_with_k_of_its_images():
    # One patient, 3 aligned images, k = 2: the release times L = 1 has norm exactly C.
    images = jnp.full((3, 2), 50.0)
    update = _update(batch_size=1, dp_clip_norm=0.7, dp_unit="patient", dp_max_per_unit=2)
    mask, ids = jnp.ones(3, bool), jnp.zeros(3, jnp.int32)
    params = {"w": jnp.zeros(2)}

    def norm(key):
        grads, realised = update.private_gradient(
            params, images, jnp.zeros(3, jnp.int32), mask, 3, key, ids
        )
        return jnp.linalg.norm(grads["w"]), realised

    norms, realised = jax.jit(jax.vmap(norm))(jax.random.split(jax.random.key(1), 50))
    assert (np.asarray(realised) == 1).all()  # q = min(B, U) / U = 1: the patient, as one unit
    np.testing.assert_allclose(norms, 0.7, rtol=1e-5)


def test_patient_level_needs_unit_ids():
    update = _update(dp_clip_norm=1.0, dp_unit="patient", dp_max_per_unit=2)
    with pytest.raises(ValueError, match="unit_ids"):
        _run(update, _client(n=4, m=4), jax.random.key(0))


def _model_args(mlp, make_clients, n=7, m=9):
    model, params = mlp
    data = make_clients([n], max_examples=m, seed=4)
    return model, (params, data.images[0], data.labels[0], data.mask[0], n, jax.random.key(2))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("per_layer", [False, True])
def test_ghost_equals_vmap_inside_local_update(mlp, make_clients, per_layer):
    model, args = _model_args(mlp, make_clients)
    kw = dict(
        local_steps=2,
        batch_size=4,
        client_lr=0.5,
        dp_clip_norm=0.05,
        dp_noise_multiplier=0.5,
        dp_per_layer=per_layer,
    )
    vmap = client.make_local_update(model.apply, "multiclass", **kw, dp_method="vmap")
    ghost = client.make_local_update(model.apply, "multiclass", **kw, dp_method="ghost")
    a, b = jax.jit(vmap)(*args), jax.jit(ghost)(*args)
    _assert_trees_close(a.delta, b.delta)
    # The clipping acted (C is far below the gradient norms), so this compared clipped sums.
    plain = client.make_local_update(
        model.apply, "multiclass", **{**kw, "dp_clip_norm": 1e3, "dp_noise_multiplier": 0.0}
    )
    assert not np.allclose(
        a.delta["Dense_0"]["kernel"],
        jax.jit(plain)(*args).delta["Dense_0"]["kernel"],
    )


def test_ghost_inside_a_vmapped_cohort_equals_vmap(mlp, make_clients):
    model, params = mlp
    data = make_clients([5, 3], max_examples=6, seed=2)
    keys = jax.random.split(jax.random.key(0), 2)
    kw = dict(local_steps=1, batch_size=3, client_lr=0.5, dp_clip_norm=0.1, dp_noise_multiplier=1.0)
    outs = []
    for method in ("vmap", "ghost"):
        update = client.make_local_update(model.apply, "multiclass", **kw, dp_method=method)
        run = jax.jit(jax.vmap(update, in_axes=(None, 0, 0, 0, 0, 0)))
        outs.append(run(params, data.images, data.labels, data.mask, data.counts, keys).delta)
    _assert_trees_close(*outs)


def test_per_layer_clipping_bounds_each_leaf():
    # Two leaves with very unequal gradients: per-layer clipping brings EACH to C / sqrt(2).
    def two_leaves(params, x, y):
        del y
        return 0.5 * jnp.sum((params["w"] - x) ** 2, -1) + 0.5 * jnp.sum(
            (params["b"] - 0.01 * x) ** 2, -1
        )

    params = {"w": jnp.zeros(3), "b": jnp.zeros(3)}
    images = jnp.full((1, 3), 1e3)
    clip = 2.0
    args = (params, images, jnp.zeros(1, jnp.int32), jnp.ones(1, bool), 1, jax.random.key(0))
    layered = _update(
        loss_fn=two_leaves, batch_size=1, client_lr=1.0, dp_clip_norm=clip, dp_per_layer=True
    )
    whole = _update(loss_fn=two_leaves, batch_size=1, client_lr=1.0, dp_clip_norm=clip)
    per_layer = jax.jit(layered)(*args).delta  # n = 1, L = 1: delta = -clipped gradient
    for leaf in jax.tree.leaves(per_layer):
        np.testing.assert_allclose(np.linalg.norm(leaf), clip / np.sqrt(2), rtol=1e-5)
    global_clip = jax.jit(whole)(*args).delta
    assert np.linalg.norm(global_clip["b"]) < 0.1 * clip / np.sqrt(2)  # the global clip differs


@pytest.mark.parametrize("unit", ["example", "patient"])
def test_microbatching_equals_no_microbatching(mlp, make_clients, unit):
    model, args = _model_args(mlp, make_clients)
    extra = {"unit_ids": jnp.array([0, 0, 1, 2, 2, 2, 3, -1, -1])} if unit == "patient" else {}
    kw = dict(
        local_steps=2,
        batch_size=5,
        client_lr=0.5,
        dp_clip_norm=0.1,
        dp_noise_multiplier=1.0,
        dp_unit=unit,
    )
    if unit == "patient":
        kw["dp_max_per_unit"] = 2
    one = client.make_local_update(model.apply, "multiclass", **kw)
    micro = client.make_local_update(model.apply, "multiclass", **kw, dp_microbatch_size=2)
    _assert_trees_close(jax.jit(one)(*args, **extra).delta, jax.jit(micro)(*args, **extra).delta)


def test_batch_and_noise_keys_are_the_named_step_streams():
    # The release is exactly privatize_sum with fold_in(step_key, STEP_NOISE), and the batch is
    # exactly poisson_rows with fold_in(step_key, STEP_BATCH): two different keys.
    images, labels, mask, n = _client(n=10, m=12, dim=5)
    sigma, clip, batch = 1.3, 0.8, 4
    update = _update(
        loss_fn=zero_grad_loss, batch_size=batch, dp_clip_norm=clip, dp_noise_multiplier=sigma
    )
    params = {"w": jnp.zeros(5)}
    step_key = jax.random.key(12)
    grads, realised = update.private_gradient(params, images, labels, mask, n, step_key)
    batch_key = jax.random.fold_in(step_key, randomness.STEP_BATCH)
    noise_key = jax.random.fold_in(step_key, randomness.STEP_NOISE)
    assert randomness.STEP_BATCH != randomness.STEP_NOISE
    assert not np.array_equal(jax.random.key_data(batch_key), jax.random.key_data(noise_key))
    expected = noise.privatize_sum(
        jax.tree.map(jnp.zeros_like, params), noise_key, sigma, clip, float(batch)
    )
    np.testing.assert_array_equal(grads["w"], expected["w"])
    assert int(realised) == int(sampling.poisson_rows(batch_key, mask, batch / n)[1])


def test_local_noise_has_stddev_sigma_c_and_is_independent_of_the_batch_draw():
    # Zero gradients: the private gradient is pure noise sigma C z / L, L = 4. KS at a fixed key
    # accepts the calibrated scale and rejects 2/3x and 3/2x.
    sigma, clip, batch, dim = 2.0, 1.5, 4, 8
    images, labels, mask, n = _client(n=10, m=10, dim=dim)
    update = _update(
        loss_fn=zero_grad_loss, batch_size=batch, dp_clip_norm=clip, dp_noise_multiplier=sigma
    )
    params = {"w": jnp.zeros(dim)}
    keys = jax.random.split(jax.random.key(21), 2500)
    grads, realised = jax.jit(
        jax.vmap(lambda k: update.private_gradient(params, images, labels, mask, n, k))
    )(keys)
    samples = np.asarray(grads["w"]) * batch  # sigma C z
    stddev = sigma * clip
    assert stats.kstest(samples.ravel(), "norm", args=(0, stddev)).pvalue > 0.01
    for wrong in (2 / 3, 3 / 2):
        assert stats.kstest(samples.ravel(), "norm", args=(0, wrong * stddev)).pvalue < 1e-6
    # Independence of the batch draw: the realised batch size is uncorrelated with the noise.
    realised = np.asarray(realised, np.float64)
    assert realised.std() > 0.5  # the batch really is random (Binomial(10, 0.4))
    for j in range(dim):
        assert abs(np.corrcoef(realised, samples[:, j])[0, 1]) < 0.08


def test_loss_is_nan_under_local_dp_and_finite_without():
    data = _client(n=6, m=6)
    ids = {"unit_ids": jnp.array([0, 0, 1, 1, 2, 2])}
    for kw, extra in (
        (dict(dp_clip_norm=1.0, dp_noise_multiplier=1.0), {}),
        (dict(dp_clip_norm=1.0, dp_unit="patient", dp_max_per_unit=2), ids),
    ):
        images, labels, mask, n = data
        out = jax.jit(_update(**kw))(
            {"w": jnp.zeros(3)}, images, labels, mask, n, jax.random.key(0), **extra
        )
        assert np.isnan(out.loss) and np.all(np.isfinite(out.delta["w"]))
        assert float(out.num_examples) == 6.0  # the site's size: public, outside the guarantee
    assert np.isfinite(_run(_update(), data, jax.random.key(0)).loss)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dp_method="loop"), r"dp_method='loop' must be one of \('vmap', 'ghost'\)"),
        (dict(dp_unit="site"), r"dp_unit='site' must be one of \('example', 'patient'\)"),
        (dict(dp_microbatch_size=0), "dp_microbatch_size=0 must be None or an integer >= 1"),
        (dict(dp_unit="patient"), "dp_max_per_unit=None must be an integer >= 1"),
        (dict(dp_unit="patient", dp_max_per_unit=0), "dp_max_per_unit=0 must be"),
        (dict(dp_max_per_unit=2), "dp_max_per_unit=2 must be None unless dp_unit='patient'"),
        (dict(dp_unit="patient", dp_max_per_unit=2, dp_per_layer=True), "dp_per_layer"),
    ],
)
def test_invalid_local_dp_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _update(dp_clip_norm=1.0, **kwargs)
