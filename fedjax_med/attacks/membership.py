"""Membership inference: loss-threshold and LiRA scores, ROC, AUC and TPR at low FPR.

Two attacks score each example; a higher score means "more likely a training member":

* loss threshold (Yeom et al., CSF 2018, https://arxiv.org/abs/1709.01604): ``-loss``; for
  segmentation also with the per-example soft Dice loss as the loss (:func:`dice_loss_scores`);
* LiRA, the likelihood-ratio attack (Carlini et al., IEEE S&P 2022,
  https://arxiv.org/abs/2112.03570): shadow models trained with (IN) and without (OUT) each
  example give Gaussian fits of the logit-scaled confidence ``phi = log(p_y / (1 - p_y))``; the
  target model's ``phi`` is scored by the likelihood ratio (online) or by how far it lies above
  the OUT Gaussian (offline). For segmentation ``phi`` is the per-pixel logit-scaled confidence
  of the true class averaged over the image (:func:`confidences`).

Report TPR at a low FPR (0.1%, 1%) next to AUC, as Carlini et al. recommend: an attack that
confidently identifies a few members matters more than a small average advantage.

Statistics run on the host in NumPy/SciPy; shadow training and confidences run in JAX, with all
shadow models trained together under ``jax.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from fedjax_med.models import losses

Params = Any
PRNGKey = jax.Array

# Floor on fitted standard deviations so a constant shadow confidence cannot divide by zero.
_MIN_STD = 1e-6


def roc_curve(
    scores_members: np.ndarray, scores_nonmembers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """ROC of "predict member when score >= t" over all thresholds ``t``.

    Tied scores move together, so the curve has one point per distinct score (plus ``(0, 0)``).

    Args:
      scores_members: scores of true members, shape ``(P,)``.
      scores_nonmembers: scores of true non-members, shape ``(Q,)``.

    Returns:
      ``(fpr, tpr)``, both non-decreasing, starting at 0 and ending at 1.

    Examples:
      >>> fpr, tpr = roc_curve(np.array([3.0, 2.0]), np.array([1.0, 0.0]))
      >>> fpr.tolist(), tpr.tolist()
      ([0.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0, 1.0])
    """
    pos = np.asarray(scores_members, dtype=np.float64).ravel()
    neg = np.asarray(scores_nonmembers, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need members and non-members, got {pos.size=} and {neg.size=}")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("scores must not be NaN")
    scores = np.concatenate([pos, neg])
    is_member = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    # Last index of each run of equal scores: the threshold admits the whole run at once.
    last = np.flatnonzero(np.diff(scores) != 0)
    last = np.append(last, scores.size - 1)
    tp = np.cumsum(is_member)[last]
    fp = (last + 1) - tp
    fpr = np.concatenate([[0.0], fp / neg.size])
    tpr = np.concatenate([[0.0], tp / pos.size])
    return fpr, tpr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under an ROC curve (trapezoids), e.g. from :func:`roc_curve`.

    Examples:
      >>> auc(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]))
      1.0
    """
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, fpr_target: float) -> float:
    """Highest TPR among ROC points with FPR <= ``fpr_target`` (e.g. 0.001 or 0.01).

    Examples:
      >>> tpr_at_fpr(np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0, 1.0]), 0.01)
      0.5
    """
    if not 0 <= fpr_target <= 1:
        raise ValueError(f"{fpr_target=} must be in [0, 1]")
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    ok = fpr <= fpr_target
    return float(tpr[ok].max()) if ok.any() else 0.0


def summarize(scores_members: np.ndarray, scores_nonmembers: np.ndarray) -> dict[str, Any]:
    """AUC and TPR at 0.1% and 1% FPR of an attack, plus its ROC curve (``fpr``, ``tpr``).

    Carlini et al. (https://arxiv.org/abs/2112.03570) argue that the low-FPR regime, not the
    AUC, says whether an attack identifies members confidently.

    Examples:
      >>> s = summarize(np.array([3.0, 2.0]), np.array([1.0, 0.0]))
      >>> s["auc"], s["tpr_at_1%_fpr"], s["members"]
      (1.0, 1.0, 2)
    """
    fpr, tpr = roc_curve(scores_members, scores_nonmembers)
    return {
        "auc": auc(fpr, tpr),
        "tpr_at_0.1%_fpr": tpr_at_fpr(fpr, tpr, 0.001),
        "tpr_at_1%_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "members": int(np.size(scores_members)),
        "nonmembers": int(np.size(scores_nonmembers)),
        "fpr": fpr,
        "tpr": tpr,
    }


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al. (CSF 2018): members have low loss, so the score is ``-loss``.

    Examples:
      >>> loss_threshold_scores(np.array([0.1, 2.0])).tolist()
      [-0.1, -2.0]
    """
    return -np.asarray(losses, dtype=np.float64)


def dice_loss_scores(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Yeom et al.'s threshold score for segmentation with the soft Dice loss: ``-L_Dice``.

    ``L_Dice`` is :func:`fedjax_med.models.losses.dice_loss`, the Dice term of the training loss,
    of each example's per-pixel probabilities ``(N, H, W, K)`` against its mask ``(N, H, W)``:
    ``1 - mean_c D_c`` over the foreground classes (an absent class scores 1 when not
    predicted). A model that memorised its training masks segments them better than unseen
    ones.

    Examples:
      >>> masks = np.array([[[0, 1]], [[0, 1]]])
      >>> probs = np.stack([masks == 0, masks == 1], -1).astype(float)  # a perfect prediction
      >>> probs[1] = 0.5  # an unsure one
      >>> [round(float(-v), 4) for v in dice_loss_scores(probs, masks)]  # the Dice losses
      [0.0, 0.3333]
    """
    value = losses.dice_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(masks))
    return loss_threshold_scores(np.asarray(value))


def balanced_membership(rng: np.random.Generator, num_models: int, num_examples: int) -> np.ndarray:
    """Membership matrix where each example is IN for exactly half the models (Carlini et al.).

    Each example then has ``num_models // 2`` IN and as many OUT shadows, so no Gaussian is fit
    to zero samples.

    Returns:
      Boolean array of shape ``(num_models, num_examples)``.

    Examples:
      >>> m = balanced_membership(np.random.default_rng(0), 4, 3)
      >>> m.sum(axis=0).tolist()
      [2, 2, 2]
    """
    if num_models < 2:
        raise ValueError(f"{num_models=} must be >= 2")
    keys = rng.random((num_models, num_examples))
    ranks = np.argsort(np.argsort(keys, axis=0), axis=0)
    return ranks < num_models // 2


def _fit(phi: np.ndarray, mask: np.ndarray, global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of ``phi`` over the models where ``mask`` holds.

    An example with no such model falls back to the pooled mean; the std is pooled over all
    examples when ``global_variance`` (few shadows) or when an example has fewer than 2 samples.
    """
    count = mask.sum(axis=0)
    total = np.where(mask, phi, 0.0).sum(axis=0)
    pooled_mean = phi[mask].mean() if mask.any() else 0.0
    mean = np.where(count > 0, total / np.maximum(count, 1), pooled_mean)
    resid2 = np.where(mask, (phi - mean) ** 2, 0.0)
    dof = max(int(mask.sum()) - int((count > 0).sum()), 1)
    pooled_var = resid2.sum() / dof
    per_var = resid2.sum(axis=0) / np.maximum(count - 1, 1)
    var = np.full_like(mean, pooled_var) if global_variance else per_var
    var = np.where(count >= 2, var, pooled_var)
    return mean, np.maximum(np.sqrt(var), _MIN_STD)


def _check_lira(shadow_phi, shadow_in, target_phi):
    shadow_phi = np.asarray(shadow_phi, np.float64)
    shadow_in = np.asarray(shadow_in, bool)
    target_phi = np.asarray(target_phi, np.float64)
    if shadow_phi.ndim != 2 or shadow_in.shape != shadow_phi.shape:
        raise ValueError(
            f"shadow_phi {shadow_phi.shape} and shadow_in {shadow_in.shape} must be equal (N, M)"
        )
    if target_phi.shape != shadow_phi.shape[1:]:
        raise ValueError(f"target_phi {target_phi.shape} must be (M,) = {shadow_phi.shape[1:]}")
    return shadow_phi, shadow_in, target_phi


def lira_offline_scores(
    shadow_phi: np.ndarray,
    shadow_in: np.ndarray,
    target_phi: np.ndarray,
    global_variance: bool = False,
) -> np.ndarray:
    """Offline LiRA: log-probability that an OUT model gives a confidence below the target's.

    ``score_i = log Phi((phi_i - mu_out_i) / sigma_out_i)``, the one-sided test of Carlini et al.
    (https://arxiv.org/abs/2112.03570, Sec. VI-C); only OUT shadows are needed, so shadows can be
    trained before the target examples are known. ``shadow_in`` marks which shadows saw which
    example; IN entries are ignored.

    Args:
      shadow_phi: ``(N, M)`` logit-scaled confidences of N shadow models on M examples.
      shadow_in: ``(N, M)`` bool, True where shadow n trained on example m.
      target_phi: ``(M,)`` confidences of the attacked model.
      global_variance: pool one variance over all examples (better with few shadows).

    Returns:
      ``(M,)`` scores, higher = more likely a member.
    """
    shadow_phi, shadow_in, target_phi = _check_lira(shadow_phi, shadow_in, target_phi)
    mu, sd = _fit(shadow_phi, ~shadow_in, global_variance)
    return stats.norm.logcdf((target_phi - mu) / sd)


def lira_online_scores(
    shadow_phi: np.ndarray,
    shadow_in: np.ndarray,
    target_phi: np.ndarray,
    global_variance: bool = False,
) -> np.ndarray:
    """Online LiRA: ``log N(phi; mu_in, sigma_in^2) - log N(phi; mu_out, sigma_out^2)``.

    The likelihood ratio of Carlini et al. (https://arxiv.org/abs/2112.03570, Alg. 1) with
    per-example Gaussians fit to IN and OUT shadow confidences; see :func:`lira_offline_scores`
    for the arguments.

    Examples:
      >>> phi = np.array([[3.0, 0.0], [3.2, 0.2], [0.0, 3.0], [0.2, 3.2]])
      >>> m = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool)
      >>> s = lira_online_scores(phi, m, np.array([3.1, 0.1]))
      >>> bool(s[0] > 0 > s[1])
      True
    """
    shadow_phi, shadow_in, target_phi = _check_lira(shadow_phi, shadow_in, target_phi)
    mu_in, sd_in = _fit(shadow_phi, shadow_in, global_variance)
    mu_out, sd_out = _fit(shadow_phi, ~shadow_in, global_variance)
    return stats.norm.logpdf(target_phi, mu_in, sd_in) - stats.norm.logpdf(
        target_phi, mu_out, sd_out
    )


def train_shadow_models(
    init_fn: Callable[[PRNGKey], Params],
    loss_fn: Callable[[Params, jax.Array, jax.Array], jax.Array],
    images: jax.Array,
    labels: jax.Array,
    membership: np.ndarray,
    steps: int,
    lr: float,
    key: PRNGKey,
    momentum: float | None = 0.9,
    batch_size: int | None = None,
) -> Params:
    """Trains N models together under ``jax.vmap``; model n sees only its IN examples.

    Each step is SGD on the masked mean of the per-example loss: over all IN examples
    (``batch_size=None``), or over ``batch_size`` of them drawn uniformly with replacement from
    the step's key. All models share one compiled program with static shapes; ``lax.scan`` runs
    the steps. A model with an empty row never moves from its initialisation.

    Args:
      init_fn: ``key -> params`` of one model.
      loss_fn: ``(params, image, label) -> scalar`` loss of *one* example.
      images: ``(M, ...)`` all candidate examples.
      labels: ``(M,)`` their labels.
      membership: ``(N, M)`` bool, which examples each model trains on.
      steps: number of full-batch steps.
      lr: SGD learning rate.
      key: PRNG key; model n is initialised from ``fold_in(key, n)``.
      momentum: SGD momentum (``None`` for plain gradient descent).
      batch_size: examples per step (``None``: every IN example, full-batch).

    Returns:
      Params stacked along a leading axis of size N.
    """
    membership = jnp.asarray(membership, jnp.float32)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    if membership.ndim != 2 or membership.shape[1] != images.shape[0]:
        raise ValueError(f"membership {membership.shape} must be (N, M={images.shape[0]})")
    if steps < 1:
        raise ValueError(f"{steps=} must be >= 1")
    if batch_size is not None and not (int(batch_size) == batch_size and batch_size >= 1):
        raise ValueError(f"{batch_size=} must be None or an integer >= 1")
    num_models, num_examples = membership.shape
    opt = optax.sgd(lr, momentum=momentum)
    per_example = jax.vmap(loss_fn, in_axes=(None, 0, 0))

    def masked_loss(params, mask):
        return jnp.sum(mask * per_example(params, images, labels)) / jnp.maximum(mask.sum(), 1.0)

    def sampled_loss(params, mask, step_key):
        count = mask.sum()
        p = jnp.where(count > 0, mask / jnp.maximum(count, 1.0), 1.0 / num_examples)
        idx = jax.random.choice(step_key, num_examples, (batch_size,), p=p)
        return jnp.mean(mask[idx] * per_example(params, images[idx], labels[idx]))

    def train_one(model_key, mask):
        init_key, data_key = jax.random.split(model_key)
        params = init_fn(init_key if batch_size else model_key)

        def step(carry, step_index):
            params, opt_state = carry
            if batch_size:
                step_key = jax.random.fold_in(data_key, step_index)
                grads = jax.grad(sampled_loss)(params, mask, step_key)
            else:
                grads = jax.grad(masked_loss)(params, mask)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        carry = (params, opt.init(params))
        (params, _), _ = jax.lax.scan(step, carry, jnp.arange(steps))
        return params

    keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(num_models))
    return jax.jit(jax.vmap(train_one))(keys, membership)


def logit_confidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``phi = log(p_y / (1 - p_y)) = z_y - logsumexp(z_{j != y})``, stable for confident models.

    Examples:
      >>> float(logit_confidence(jnp.array([[0.0, 0.0]]), jnp.array([0]))[0])
      0.0
    """
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    others = jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return z_y - others


def confidences(
    apply_fn: Callable[[Params, jax.Array], jax.Array],
    stacked_params: Params,
    images: jax.Array,
    labels: jax.Array,
) -> np.ndarray:
    """``(N, M)`` logit-scaled confidences of N stacked models.

    ``apply_fn(params, images) -> logits`` is the pure forward pass of one model; the stacked
    params come from :func:`train_shadow_models` (or any leading model axis). Per-pixel logits
    ``(M, H, W, K)`` with masks ``(M, H, W)`` (segmentation) give each pixel's
    :func:`logit_confidence`, averaged over the image: one score per example.
    """

    def one_model(p):
        phi = logit_confidence(apply_fn(p, images), labels)
        return phi.reshape(phi.shape[0], -1).mean(axis=1)

    phi = jax.jit(jax.vmap(one_model))(stacked_params)
    return np.asarray(phi, np.float64)
