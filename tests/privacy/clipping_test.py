"""Clipping: norms bounded by C, padding contributes nothing, microbatching and ghost equal vmap."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from fedjax_med.privacy import clipping, per_example


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    """Tiny models: compile time dominates, so skip most XLA optimisations in this module."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# ---------------------------------------------------------------- tiny models


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(6)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(x)


class _Cnn(nn.Module):
    """Strided SAME and VALID convs, max pooling, GroupNorm and a dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(1, 1))
        x = nn.Conv(5, (2, 2), strides=1, padding="VALID", kernel_dilation=2)(x)
        x = nn.tanh(nn.GroupNorm(num_groups=1)(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _flax_case(model, image_shape, batch=7, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    inputs = jax.random.normal(keys[0], (batch,) + image_shape)
    labels = jax.random.randint(keys[1], (batch,), 0, 3)
    params = jax.jit(model.init)(keys[2], inputs[:1])

    def loss_fn(params, image, label):
        logits = model.apply(params, image[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    return loss_fn, params, inputs, labels


def _lax_case(batch=7):
    """Weights as lhs, inside a nested jit, shared, NCHW conv, grouped and transposed convs."""
    keys = jax.random.split(jax.random.key(3), 8)
    params = {
        "lhs": jax.random.normal(keys[0], (4, 5)),
        "nested": jax.random.normal(keys[1], (4, 3)),
        "shared": jax.random.normal(keys[2], (3, 3)) / 2,
        "nchw": jax.random.normal(keys[3], (2, 1, 3, 3)) / 3,  # OIHW
        "grouped": jax.random.normal(keys[4], (2, 2, 1, 4)) / 2,  # HWIO, 2 groups
        "transposed": jax.random.normal(keys[5], (2, 2, 4, 2)) / 2,
    }
    inputs = jax.random.normal(keys[6], (batch, 5))
    labels = jax.random.normal(keys[7], (batch, 3))

    def loss_fn(params, x, y):
        h = jnp.tanh(params["lhs"] @ x)
        h = jax.jit(lambda w, h: jnp.tanh(h @ w))(params["nested"], h)
        h = h @ params["shared"] @ params["shared"].T
        img = jnp.outer(jnp.concatenate([h, h]), jnp.concatenate([h, h]))[None, None]
        img = lax.conv_general_dilated(img, params["nchw"], (1, 1), "SAME")  # (1, 2, 6, 6)
        img = jnp.transpose(img, (0, 2, 3, 1))
        img = lax.conv_general_dilated(
            img,
            params["grouped"],
            (2, 2),
            "VALID",
            feature_group_count=2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        img = lax.conv_transpose(
            jnp.tanh(img),
            params["transposed"],
            (2, 2),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return jnp.sum((jnp.mean(img, axis=(0, 1, 2))[:2] - y[:2]) ** 2) + jnp.sum(h * y)

    return loss_fn, params, inputs, labels


CASES = {
    "mlp": lambda: _flax_case(_Mlp(), (2, 3)),
    "cnn": lambda: _flax_case(_Cnn(), (8, 8, 2)),
    "lax": _lax_case,
}


def _loop_clipped_sum(loss_fn, params, inputs, labels, mask, clip_norm):
    """Reference: Python loop of single-example grads, each clipped, summed."""
    grad = jax.jit(jax.grad(loss_fn))
    total = jax.tree.map(jnp.zeros_like, params)
    for i in np.flatnonzero(mask):
        g = grad(params, inputs[i], labels[i])
        norm = math.sqrt(sum(float(jnp.sum(leaf**2)) for leaf in jax.tree.leaves(g)))
        factor = min(1.0, clip_norm / norm)
        total = jax.tree.map(lambda t, g, f=factor: t + f * g, total, g)
    return total


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- clip_per_example & friends

PYTREES = {
    "array": lambda k: jax.random.normal(k, (4, 7)),
    "dict": lambda k: {"a": jax.random.normal(k, (4, 2, 3)), "b": jnp.zeros((4,))},
    "nested": lambda k: (jax.random.normal(k, (4, 1)) * 10, [jax.random.normal(k, (4, 5, 2))]),
}


@pytest.mark.parametrize(
    "tree,dtype,clip_norm",
    list(itertools.product(PYTREES, [jnp.float32, jnp.bfloat16], [1e-3, 0.5, 2.0, math.inf])),
)
def test_clipped_norms_at_most_c(tree, dtype, clip_norm):
    grads = jax.tree.map(lambda x: x.astype(dtype), PYTREES[tree](jax.random.key(0)))
    clipped, norms = clipping.clip_per_example(grads, clip_norm)
    new_norms = clipping.global_norms(clipped)
    slack = 1e-5 if dtype == jnp.float32 else 1e-2
    assert jnp.all(new_norms <= clip_norm * (1 + slack))
    # Unclipped examples are unchanged.
    small = norms <= clip_norm
    np.testing.assert_allclose(new_norms[small], norms[small], rtol=slack)
    assert jax.tree.map(lambda x: x.dtype, clipped) == jax.tree.map(lambda x: x.dtype, grads)


def test_zero_gradient_gives_no_nan():
    clipped, norms = clipping.clip_per_example({"w": jnp.zeros((3, 2))}, 1.0)
    assert jnp.all(clipped["w"] == 0) and jnp.all(norms == 0)


@pytest.mark.parametrize("mode", clipping.LAYER_MODES)
def test_per_layer_thresholds_compose_to_c(mode):
    params = {"k": jnp.zeros((3, 4)), "b": jnp.zeros(4), "head": [jnp.zeros((4, 2))]}
    thresholds = clipping.per_layer_thresholds(params, 3.0, mode)
    assert jax.tree.structure(thresholds) == jax.tree.structure(params)
    assert math.isclose(math.sqrt(sum(c**2 for c in jax.tree.leaves(thresholds))), 3.0)


def test_clip_per_layer_bounds_each_leaf_and_total():
    grads = PYTREES["dict"](jax.random.key(1))
    thresholds = clipping.per_layer_thresholds(jax.tree.map(lambda g: g[0], grads), 0.5)
    clipped, _ = clipping.clip_per_layer(grads, thresholds)
    for leaf, c in zip(jax.tree.leaves(clipped), jax.tree.leaves(thresholds), strict=True):
        assert jnp.all(clipping.global_norms(leaf) <= c * (1 + 1e-6))
    assert jnp.all(clipping.global_norms(clipped) <= 0.5 * (1 + 1e-6))


def test_sensitivity():
    assert clipping.sensitivity(1.5) == 1.5
    assert clipping.sensitivity(1.5, relation="replace_one") == 3.0
    fn = clipping.clipped_grad_sum(lambda p, x, y: p * x, clip_norm=0.7)
    assert fn.sensitivity() == 0.7 and fn.unit == "example"
    with pytest.raises(ValueError, match="relation"):
        clipping.sensitivity(1.0, relation="swap")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": 1.0, "method": "magic"}, "method"),
        ({"clip_norm": 1.0, "microbatch_size": 0}, "microbatch_size"),
        ({"clip_norm": 1.0, "layer_mode": "random"}, "layer_mode"),
    ],
)
def test_invalid_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        clipping.clipped_grad_sum(lambda p, x, y: p * x, **kwargs)


# ---------------------------------------------------------------- clipped_grad_sum


@pytest.fixture(scope="module")
def mlp_case():
    return CASES["mlp"]()


def test_clipped_grad_sum_equals_loop(mlp_case):
    loss_fn, params, inputs, labels = mlp_case
    mask = jnp.array([True, True, False, True, True, False, True])
    fn = jax.jit(clipping.clipped_grad_sum(loss_fn, clip_norm=0.3))
    total, aux = fn(params, inputs, labels, mask)
    _assert_trees_close(total, _loop_clipped_sum(loss_fn, params, inputs, labels, mask, 0.3))
    grads = jax.jit(per_example.per_example_grads(loss_fn))(params, inputs, labels)
    norms = clipping.global_norms(grads)
    assert int(aux["count"]) == 5
    assert int(aux["num_clipped"]) == int(jnp.sum((norms > 0.3) & mask))
    np.testing.assert_allclose(aux["mean_grad_norm"], jnp.mean(norms[mask]), rtol=1e-5)


def test_padded_examples_contribute_exactly_zero(mlp_case):
    loss_fn, params, inputs, labels = mlp_case
    mask = jnp.arange(7) < 4
    fn = jax.jit(clipping.clipped_grad_sum(loss_fn, clip_norm=0.3))
    garbage = inputs.at[4:].set(jnp.nan)
    total, aux = fn(params, garbage, labels, mask)
    other, _ = fn(params, inputs.at[4:].set(1e6), labels, mask)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(total))
    jax.tree.map(np.testing.assert_array_equal, total, other)
    real, _ = fn(params, inputs[:4], labels[:4], jnp.ones(4, bool))
    _assert_trees_close(total, real)
    assert int(aux["count"]) == 4 and bool(jnp.isfinite(aux["mean_grad_norm"]))


def test_all_padding_gives_zero(mlp_case):
    loss_fn, params, inputs, labels = mlp_case
    total, aux = jax.jit(clipping.clipped_grad_sum(loss_fn, clip_norm=1.0))(
        params, inputs, labels, jnp.zeros(7, bool)
    )
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(total))
    assert int(aux["count"]) == 0 and float(aux["mean_grad_norm"]) == 0.0


def test_per_layer_equals_manual(mlp_case):
    loss_fn, params, inputs, labels = mlp_case
    mask = jnp.ones(7, bool)
    total, aux = jax.jit(clipping.clipped_grad_sum(loss_fn, clip_norm=0.2, per_layer=True))(
        params, inputs, labels, mask
    )
    grads = jax.jit(per_example.per_example_grads(loss_fn))(params, inputs, labels)
    thresholds = clipping.per_layer_thresholds(params, 0.2)
    clipped, layer_norms = clipping.clip_per_layer(grads, thresholds)
    _assert_trees_close(total, jax.tree.map(lambda g: jnp.sum(g, 0), clipped))
    flags = jax.tree.leaves(jax.tree.map(lambda n, c: n > c, layer_norms, thresholds))
    assert int(aux["num_clipped"]) == int(jnp.sum(jnp.any(jnp.stack(flags), 0)))


def test_no_recompilation_on_second_call(mlp_case):
    loss_fn, params, inputs, labels = mlp_case
    traces = []

    def counting_loss(p, x, y):
        traces.append(1)
        return loss_fn(p, x, y)

    fn = jax.jit(clipping.clipped_grad_sum(counting_loss, clip_norm=1.0))
    fn(params, inputs, labels, jnp.ones(7, bool))
    count = len(traces)
    fn(params, inputs + 1, labels, jnp.arange(7) < 3)
    assert len(traces) == count


# ---------------------------------------------------------------- microbatching & ghost


def _compare_methods(case, per_layer, configs):
    loss_fn, params, inputs, labels = case
    mask = jnp.array([True, True, True, False, True, True, False])
    clip_norm = 0.05  # small enough that most examples are clipped
    results = {}
    for method, microbatch in configs:
        fn = clipping.clipped_grad_sum(
            loss_fn,
            clip_norm=clip_norm,
            per_layer=per_layer,
            microbatch_size=microbatch,
            method=method,
        )
        results[method, microbatch] = jax.jit(fn)(params, inputs, labels, mask)
    reference_total, reference_aux = results[configs[0]]
    assert int(reference_aux["num_clipped"]) >= 3
    for key, (total, aux) in results.items():
        _assert_trees_close(total, reference_total, rtol=1e-4, atol=1e-6)
        assert int(aux["count"]) == 5, key
        assert int(aux["num_clipped"]) == int(reference_aux["num_clipped"]), key
        np.testing.assert_allclose(aux["mean_grad_norm"], reference_aux["mean_grad_norm"], 1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_ghost_and_microbatched_ghost_equal_vmap(name):
    # A batch of 7 in microbatches of 4 also exercises the padding of the last chunk.
    _compare_methods(CASES[name](), False, [("vmap", None), ("ghost", None), ("ghost", 4)])


def test_microbatched_vmap_equals_one_shot(mlp_case):
    _compare_methods(mlp_case, False, [("vmap", None), ("vmap", 3)])


def test_per_layer_ghost_equals_vmap():
    _compare_methods(CASES["cnn"](), True, [("vmap", None), ("ghost", 3)])


def test_ghost_taps_linear_layers_only():
    from fedjax_med.privacy import ghost

    loss_fn, params, inputs, labels = _lax_case()
    leaves, treedef = jax.tree.flatten(params)
    closed = jax.make_jaxpr(lambda w, x, y: loss_fn(jax.tree.unflatten(treedef, w), x, y))(
        leaves, inputs[0], labels[0]
    )
    names = jax.tree.unflatten(treedef, list(range(len(leaves))))
    tapped = {tap.leaf for tap in ghost._find_taps(closed.jaxpr, len(leaves))}
    # Shared, grouped-conv and transposed-conv (lhs-dilated, still groups of 1) weights.
    assert tapped == {names["lhs"], names["nested"], names["nchw"], names["transposed"]}


def test_ghost_clip_inf_equals_plain_gradient_sum(mlp_case):
    loss_fn, params, inputs, labels = mlp_case
    total, aux = jax.jit(clipping.clipped_grad_sum(loss_fn, clip_norm=math.inf, method="ghost"))(
        params, inputs, labels, None
    )
    batch_grad = jax.jit(
        jax.grad(lambda p: jnp.sum(jax.vmap(loss_fn, (None, 0, 0))(p, inputs, labels)))
    )
    _assert_trees_close(total, batch_grad(params), rtol=1e-4)
    assert int(aux["num_clipped"]) == 0


# ---------------------------------------------------------------- unit (patient) level


def test_unit_clipping_equals_manual_and_bounds_each_unit(mlp_case):
    loss_fn, params, inputs, labels = mlp_case
    mask = jnp.array([True, True, True, True, False, True, True])
    slots = jnp.array([0, 0, 2, 2, 1, 2, 3])  # unit 1 only has a padded example
    fn = jax.jit(clipping.clipped_unit_grad_sum(loss_fn, clip_norm=0.1), static_argnums=5)
    total, aux = fn(params, inputs, labels, mask, slots, 5)
    grads = jax.jit(per_example.per_example_grads(loss_fn))(params, inputs, labels)
    expected = jax.tree.map(jnp.zeros_like, params)
    for members in ([0, 1], [2, 3, 5], [6]):
        unit = jax.tree.map(lambda g, m=members: jnp.sum(g[jnp.array(m)], 0), grads)
        norm = float(clipping.global_norms(jax.tree.map(lambda u: u[None], unit))[0])
        expected = jax.tree.map(lambda e, u, n=norm: e + min(1, 0.1 / n) * u, expected, unit)
    _assert_trees_close(total, expected)
    assert int(aux["count"]) == 3 and int(aux["num_examples"]) == 6

    # Removing one whole unit moves the sum by at most C.
    without = fn(params, inputs, labels, mask & (slots != 2), slots, 5)[0]
    diff = jax.tree.map(lambda a, b: (a - b)[None], total, without)
    assert float(clipping.global_norms(diff)[0]) <= 0.1 * (1 + 1e-5)

    micro = jax.jit(
        clipping.clipped_unit_grad_sum(loss_fn, clip_norm=0.1, microbatch_size=3),
        static_argnums=5,
    )(params, inputs, labels, mask, slots, 5)
    _assert_trees_close(micro[0], total)
    assert {k: int(v) for k, v in micro[1].items() if k != "mean_grad_norm"} == {
        k: int(v) for k, v in aux.items() if k != "mean_grad_norm"
    }
