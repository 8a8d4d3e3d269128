"""Tests for membership inference: ROC/AUC/TPR@FPR, loss threshold and vmapped LiRA shadows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_med.attacks import membership

NUM_MODELS = 9  # model 0 is the target, 1..8 are shadows.
NUM_EXAMPLES = 128
DIM, HIDDEN, CLASSES = 8, 64, 4


def _init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (DIM, HIDDEN)) / jnp.sqrt(DIM),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / jnp.sqrt(HIDDEN),
        "b2": jnp.zeros(CLASSES),
    }


def _apply(params, images):
    h = jnp.tanh(images @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _loss(params, image, label):
    logits = _apply(params, image[None])[0]
    return -jax.nn.log_softmax(logits)[label]


def _data():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(NUM_EXAMPLES, DIM)).astype(np.float32)
    return images, rng.integers(0, CLASSES, NUM_EXAMPLES)


@functools.cache
def _overfit_setting():
    """Random labels, tiny MLP with more parameters than examples: members get low loss."""
    images, labels = _data()
    rng = np.random.default_rng(1)
    member = membership.balanced_membership(rng, NUM_MODELS - 1, NUM_EXAMPLES)
    target_in = rng.random(NUM_EXAMPLES) < 0.5
    never = np.zeros(NUM_EXAMPLES, bool)  # a model that never saw any example
    rows = np.concatenate([target_in[None], member, never[None]])
    params = membership.train_shadow_models(
        _init,
        _loss,
        jnp.asarray(images),
        jnp.asarray(labels),
        rows,
        300,
        0.3,
        jax.random.key(1),
    )
    phi = membership.confidences(_apply, params, jnp.asarray(images), jnp.asarray(labels))
    losses = np.asarray(
        jax.vmap(lambda p: jax.vmap(_loss, (None, 0, 0))(p, images, labels))(params)
    )
    return target_in, member, phi, losses


def _auc(scores, is_member):
    return membership.auc(*membership.roc_curve(scores[is_member], scores[~is_member]))


def test_auc_perfect_random_inverted():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=500) + 10, rng.normal(size=500)
    assert membership.auc(*membership.roc_curve(pos, neg)) == 1.0
    assert membership.auc(*membership.roc_curve(neg, pos)) == 0.0
    rand = membership.auc(*membership.roc_curve(rng.normal(size=2000), rng.normal(size=2000)))
    assert abs(rand - 0.5) < 0.05
    # All scores tied: one diagonal step.
    assert membership.auc(*membership.roc_curve(np.zeros(3), np.zeros(5))) == 0.5


def test_auc_matches_pairwise_probability():
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairwise = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert membership.auc(*membership.roc_curve(pos, neg)) == pytest.approx(pairwise)


def test_tpr_at_fpr_constructed():
    # 1000 non-members at 0..999; members: 30 above every non-member, 70 at -1.
    neg = np.arange(1000.0)
    pos = np.concatenate([np.full(30, 2000.0), np.full(70, -1.0)])
    fpr, tpr = membership.roc_curve(pos, neg)
    assert membership.tpr_at_fpr(fpr, tpr, 0.001) == pytest.approx(0.3)
    assert membership.tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(0.3)
    assert membership.tpr_at_fpr(fpr, tpr, 1.0) == 1.0
    with pytest.raises(ValueError, match="fpr_target"):
        membership.tpr_at_fpr(fpr, tpr, 2.0)


def test_logit_confidence_matches_definition():
    logits = jnp.array([[1.0, 2.0, -1.0], [0.3, 0.1, 0.2]])
    labels = jnp.array([1, 2])
    p = jax.nn.softmax(logits)[jnp.arange(2), labels]
    np.testing.assert_allclose(
        membership.logit_confidence(logits, labels), np.log(p / (1 - p)), rtol=1e-5
    )


def test_empty_membership_row_keeps_init():
    _, _, _, losses = _overfit_setting()
    init_losses = np.asarray(
        jax.vmap(_loss, (None, 0, 0))(
            _init(jax.random.fold_in(jax.random.key(1), NUM_MODELS)),
            *_data(),
        )
    )
    np.testing.assert_allclose(losses[-1], init_losses, rtol=1e-5)


def test_loss_threshold_on_overfit_and_unseen():
    target_in, member, _, losses = _overfit_setting()
    overfit_auc = _auc(membership.loss_threshold_scores(losses[0]), target_in)
    unseen_auc = _auc(membership.loss_threshold_scores(losses[-1]), target_in)
    print(f"{overfit_auc=:.3f} {unseen_auc=:.3f}")
    assert overfit_auc > 0.8
    assert abs(unseen_auc - 0.5) < 0.2
    # Shadows learned their IN examples too.
    assert losses[1:-1][member].mean() < 0.5 * losses[1:-1][~member].mean()


@pytest.mark.parametrize("global_variance", [False, True])
def test_lira_beats_chance(global_variance):
    target_in, member, phi, losses = _overfit_setting()
    shadow_phi, target_phi = phi[1:-1], phi[0]
    online = membership.lira_online_scores(shadow_phi, member, target_phi, global_variance)
    offline = membership.lira_offline_scores(shadow_phi, member, target_phi, global_variance)
    loss_auc = _auc(membership.loss_threshold_scores(losses[0]), target_in)
    online_auc, offline_auc = _auc(online, target_in), _auc(offline, target_in)
    print(f"{loss_auc=:.3f} {online_auc=:.3f} {offline_auc=:.3f} {global_variance=}")
    assert np.isfinite(online).all() and np.isfinite(offline).all()
    assert online_auc > 0.8
    assert offline_auc > 0.7
    # Random labels are memorised outright, so the loss threshold is already near 1 here.
    assert online_auc >= min(loss_auc, 0.9)


def test_lira_online_with_known_gaussians():
    rng = np.random.default_rng(0)
    n, m = 64, 200
    member = membership.balanced_membership(rng, n, m)
    shadow_phi = np.where(member, 2.0, 0.0) + rng.normal(size=(n, m))
    target_in = rng.random(m) < 0.5
    target_phi = np.where(target_in, 2.0, 0.0) + rng.normal(size=m)
    scores = membership.lira_online_scores(shadow_phi, member, target_phi)
    # Equal variances: the ratio is monotone in phi, so its AUC is the optimal one (~0.92).
    assert _auc(scores, target_in) > 0.8


def test_lira_shape_errors():
    with pytest.raises(ValueError, match="target_phi"):
        membership.lira_online_scores(np.zeros((4, 3)), np.zeros((4, 3), bool), np.zeros(2))
    with pytest.raises(ValueError, match="shadow_in"):
        membership.lira_offline_scores(np.zeros((4, 3)), np.zeros((4, 2), bool), np.zeros(3))


def test_minibatch_shadows_learn_only_their_members():
    images, labels = _data()
    member = membership.balanced_membership(np.random.default_rng(2), 2, NUM_EXAMPLES)
    rows = np.concatenate([member, np.zeros((1, NUM_EXAMPLES), bool)])
    x, y = jnp.asarray(images), jnp.asarray(labels)
    params = membership.train_shadow_models(
        _init, _loss, x, y, rows, 400, 0.3, jax.random.key(3), batch_size=16
    )
    losses = np.asarray(jax.vmap(lambda p: jax.vmap(_loss, (None, 0, 0))(p, x, y))(params))
    assert losses[:2][member].mean() < 0.5 * losses[:2][~member].mean()
    # The model with no members saw only zero-weight draws: its loss is its initial loss.
    init_key = jax.random.split(jax.random.fold_in(jax.random.key(3), 2))[0]
    init_losses = np.asarray(jax.vmap(_loss, (None, 0, 0))(_init(init_key), x, y))
    np.testing.assert_allclose(losses[-1], init_losses, rtol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        membership.train_shadow_models(
            _init, _loss, x, y, rows, 1, 0.1, jax.random.key(0), batch_size=0
        )


def test_strong_dp_sgd_hides_membership_of_the_overfit_target():
    """The overfit target's training, redone with DP-SGD (the library's clipped sum and noise,
    every member in every step, epsilon < 1): the loss-threshold AUC falls to about 0.5."""
    from fedjax_med.privacy import accounting, clipping, noise

    target_in, _, _, losses = _overfit_setting()
    images, labels = (jnp.asarray(a) for a in _data())
    grad_sum = clipping.clipped_grad_sum(_loss, clip_norm=1.0)
    sigma, steps = 30.0, 50
    epsilon = accounting.epsilon(accounting.dpsgd_event(sigma, 1.0, steps), 1e-5)
    dp = noise.dp_aggregate(sigma, 1.0, float(target_in.sum()), jax.random.key(5))
    opt = optax.chain(dp, optax.sgd(0.3, momentum=0.9))
    mask = jnp.asarray(target_in)

    def step(carry, _):
        params, state = carry
        total, _ = grad_sum(params, images, labels, mask)
        updates, state = opt.update(total, state, params)
        return (optax.apply_updates(params, updates), state), None

    params = _init(jax.random.fold_in(jax.random.key(1), 0))  # the target's initialisation
    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=300))(
        params
    )
    dp_losses = np.asarray(jax.vmap(_loss, (None, 0, 0))(params, images, labels))
    dp_auc = _auc(membership.loss_threshold_scores(dp_losses), target_in)
    overfit_auc = _auc(membership.loss_threshold_scores(losses[0]), target_in)
    print(f"{overfit_auc=:.3f} {dp_auc=:.3f} {epsilon=:.2f}")
    assert epsilon < 1 and overfit_auc > 0.8 and abs(dp_auc - 0.5) < 0.1
