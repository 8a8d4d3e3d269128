"""Gaussian noise: purity, exact scaling, calibrated stddev (KS), DP normalisation, noise keys."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_med.privacy import clipping, noise

TREE = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4), "head": [jnp.zeros((2,), jnp.bfloat16)]}


def _leaves(tree):
    return [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(tree)]


def test_same_key_twice_gives_identical_noise():
    key = jax.random.key(7)
    a = noise.add_gaussian_noise(TREE, key, 1.3)
    b = noise.add_gaussian_noise(TREE, key, 1.3)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_noise_unique_across_keys_and_leaves():
    big = {"a": jnp.zeros(1000), "b": jnp.zeros(1000)}
    draws = [noise.add_gaussian_noise(big, jax.random.key(k), 1.0) for k in range(3)]
    vectors = [leaf for d in draws for leaf in _leaves(d)]
    for i in range(len(vectors)):
        for j in range(i):
            # Independent draws: (almost) no coordinate repeats, no correlation.
            assert np.mean(vectors[i] == vectors[j]) < 0.01
            assert abs(np.corrcoef(vectors[i], vectors[j])[0, 1]) < 0.15


def test_noise_at_scale_s_is_s_times_unit_noise():
    key = jax.random.key(3)
    unit = noise.add_gaussian_noise(TREE, key, 1.0)
    for s in [0.25, 1.7, 40.0]:
        scaled = noise.add_gaussian_noise(TREE, key, s)
        for x, u, leaf in zip(
            jax.tree.leaves(scaled), jax.tree.leaves(unit), jax.tree.leaves(TREE), strict=True
        ):
            expected = (s * u.astype(jnp.float32)).astype(leaf.dtype)
            if leaf.dtype == jnp.float32:
                np.testing.assert_array_equal(x, expected)
            assert x.dtype == leaf.dtype


def _primitive_count(jaxpr, name):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _primitive_count(sub, name)
    return count


def test_one_draw_for_the_whole_tree_cut_into_leaves_in_flatten_order():
    many = {f"l{i:02d}": jnp.zeros((i % 4 + 1, 3)) for i in range(40)}
    jaxpr = jax.make_jaxpr(lambda t, k: noise.add_gaussian_noise(t, k, 1.0))(
        many, jax.random.key(0)
    )
    # One random-bits kernel however many leaves (a draw per leaf compiled one each).
    assert _primitive_count(jaxpr.jaxpr, "random_bits") == 1
    key = jax.random.key(5)
    unit = jax.random.normal(key, (sum(x.size for x in jax.tree.leaves(many)),))
    got = np.concatenate(
        [leaf.ravel() for leaf in _leaves(noise.add_gaussian_noise(many, key, 1.0))]
    )
    np.testing.assert_array_equal(got, np.asarray(unit))


def test_zero_stddev_adds_nothing_and_negative_raises():
    out = noise.add_gaussian_noise({"w": jnp.ones(3)}, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(out["w"], jnp.ones(3))
    with pytest.raises(ValueError, match="stddev"):
        noise.add_gaussian_noise({"w": jnp.ones(3)}, jax.random.key(0), -1.0)


@pytest.fixture(scope="module")
def dp_noise_sample():
    """Noise of one dp_aggregate update (sigma = 1.1, C = 0.8, L = 1) on 20,000 coordinates."""
    tx = noise.dp_aggregate(1.1, 0.8, expected_batch_size=1.0, seed_or_key=jax.random.key(11))
    zeros = {"a": jnp.zeros(12_000), "b": jnp.zeros((100, 80))}
    update, _ = tx.update(zeros, tx.init(zeros))
    return np.concatenate([leaf.ravel() for leaf in _leaves(update)])


def test_ks_accepts_calibrated_stddev_and_rejects_wrong_ones(dp_noise_sample):
    stddev = 1.1 * clipping.sensitivity(0.8)
    assert stats.kstest(dp_noise_sample, "norm", args=(0, stddev)).pvalue > 0.01
    for wrong in [2 / 3, 3 / 2]:
        assert stats.kstest(dp_noise_sample, "norm", args=(0, wrong * stddev)).pvalue < 1e-6


def test_update_without_noise_and_clipping_is_mean_times_realised_over_expected():
    def loss_fn(params, x, y):
        return 0.5 * jnp.sum((params["w"] * x - y) ** 2)

    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    inputs = jax.random.normal(jax.random.key(0), (10, 3))
    labels = jax.random.normal(jax.random.key(1), (10, 3))
    mask = jnp.arange(10) < 8  # 8 real examples, padded to capacity 10
    expected_batch_size = 12.0
    total, aux = clipping.clipped_grad_sum(loss_fn, clip_norm=math.inf)(
        params, inputs, labels, mask
    )
    tx = noise.dp_aggregate(0.0, math.inf, expected_batch_size, seed_or_key=0)
    update, state = tx.update(total, tx.init(params))
    mean_grad = jax.grad(
        lambda p: jnp.mean(jax.vmap(loss_fn, (None, 0, 0))(p, inputs[:8], labels[:8]))
    )(params)
    np.testing.assert_allclose(update["w"], mean_grad["w"] * 8 / expected_batch_size, rtol=1e-5)
    assert int(aux["count"]) == 8 and int(state.count) == 1


def test_state_is_pure_and_key_advances():
    tx = noise.dp_aggregate(1.0, 1.0, expected_batch_size=2.0, seed_or_key=5)
    grads = {"w": jnp.zeros(5)}
    state = tx.init(grads)
    first, next_state = tx.update(grads, state)
    again, _ = tx.update(grads, state)
    second, _ = tx.update(grads, next_state)
    np.testing.assert_array_equal(first["w"], again["w"])
    assert not np.any(np.asarray(first["w"]) == np.asarray(second["w"]))


def test_chains_with_an_optimizer_under_jit():
    tx = optax.chain(noise.dp_aggregate(1.0, 1.0, 4.0, seed_or_key=1), optax.sgd(0.1))
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    update, state = jax.jit(tx.update)({"w": jnp.ones(3)}, state, params)
    assert update["w"].shape == (3,) and int(state[0].count) == 1


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"expected_batch_size": 0.0}, "expected_batch_size"),
        ({"clip_norm": math.inf}, "clip_norm"),
        ({"clip_norm": 0.0}, "clip_norm"),
    ],
)
def test_dp_aggregate_validation(kwargs, field):
    args = {"noise_multiplier": 1.0, "clip_norm": 1.0, "expected_batch_size": 8.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        noise.dp_aggregate(seed_or_key=0, **args)


def test_make_noise_key_modes():
    data = lambda key: np.asarray(jax.random.key_data(key))  # noqa: E731
    key, mode = noise.make_noise_key(3, "reproducible")
    assert mode == "reproducible"
    np.testing.assert_array_equal(data(key), data(noise.make_noise_key(3)[0]))
    # A named stream of the seed, not the seed's root key itself.
    assert not np.array_equal(data(key), data(jax.random.key(3)))
    assert not np.array_equal(data(key), data(noise.make_noise_key(4)[0]))

    secure_a, mode_a = noise.make_noise_key(3, "secure")
    secure_b, _ = noise.make_noise_key(3, "secure")
    assert mode_a == "secure"
    assert not np.array_equal(data(secure_a), data(secure_b))
    assert not np.array_equal(data(secure_a), data(key))

    assert noise.make_noise_key(None, "auto")[1] == "secure"
    assert noise.make_noise_key(1, "auto")[1] == "reproducible"
    with pytest.raises(ValueError, match="seed"):
        noise.make_noise_key(None, "reproducible")
    with pytest.raises(ValueError, match="mode"):
        noise.make_noise_key(1, "lucky")


def test_privatize_sum_is_sum_plus_scaled_unit_noise_over_l():
    # Exact, no statistics: the release equals (sum + sigma S z) / L for the unit noise z.
    total = {"a": jnp.arange(4.0), "b": jnp.ones((2, 3))}
    key = jax.random.key(4)
    unit = noise.add_gaussian_noise(jax.tree.map(jnp.zeros_like, total), key, 1.0)
    release = noise.privatize_sum(total, key, 1.5, 0.8, 5.0)
    expected = jax.tree.map(lambda s, z: (s + 1.5 * 0.8 * z) / 5.0, total, unit)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), release, expected)
    quiet = noise.privatize_sum(total, key, 0.0, 0.8, 5.0)
    jax.tree.map(lambda a, s: np.testing.assert_array_equal(a, s / 5.0), quiet, total)


def test_dp_aggregate_update_is_privatize_sum_with_the_split_key():
    # One implementation of the release: dp_aggregate's update is privatize_sum.
    key = jax.random.key(9)
    total = {"w": jnp.array([1.0, -2.0, 3.0])}
    tx = noise.dp_aggregate(1.3, 0.7, 6.0, seed_or_key=key, relation="replace_one")
    update, _ = tx.update(total, tx.init(total))
    _, noise_key = jax.random.split(key)
    expected = noise.privatize_sum(total, noise_key, 1.3, clipping.sensitivity(0.7) * 2, 6.0)
    np.testing.assert_array_equal(update["w"], expected["w"])


def test_privatize_sum_accepts_a_traced_expected_batch_size():
    run = jax.jit(lambda s, n: noise.privatize_sum(s, jax.random.key(0), 1.0, 1.0, n))
    out = run({"w": jnp.zeros(2)}, jnp.float32(4.0))
    assert out["w"].shape == (2,) and bool(jnp.all(jnp.isfinite(out["w"])))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"sensitivity": 0.0}, "sensitivity"),
        ({"sensitivity": math.inf}, "sensitivity"),
        ({"expected_batch_size": 0.0}, "expected_batch_size"),
    ],
)
def test_privatize_sum_validation_names_the_argument(kwargs, field):
    args = {"noise_multiplier": 1.0, "sensitivity": 1.0, "expected_batch_size": 2.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        noise.privatize_sum({"w": jnp.zeros(1)}, jax.random.key(0), **args)
