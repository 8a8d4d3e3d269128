"""Canary audits of the library's DP-SGD step and DP-FedAvg round: correct code stays below the
accountant, every deliberately broken variant of the same code is caught."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.attacks import canaries
from fedjax_med.federated import client
from fedjax_med.models import losses, registry

SHAPE = (6, 6, 1)
TRIALS = 2000  # enough to certify epsilon ~4.9 for a perfectly separating attack
SIGMA, DELTA = 1.0, 1e-5


@pytest.fixture(scope="module")
def setup():
    model = registry.get_model("linear", input_shape=SHAPE, num_outputs=3)
    params = model.init(jax.random.key(0))
    loss = losses.example_loss_fn(model.apply, "multiclass")
    images = jax.random.uniform(jax.random.key(1), (6, *SHAPE))
    labels = jnp.arange(6) % 3
    # A large-gradient canary: a bright image with a label the model does not predict.
    canary = 10.0 * jax.random.normal(jax.random.key(2), SHAPE)
    least_likely = jnp.argmin(model.apply(params, canary[None])[0]).astype(jnp.int32)
    return loss, params, images, labels, (canary, least_likely)


def _accountant(sigma):
    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(dp_accounting.GaussianDpEvent(sigma))
    return acct.get_epsilon(DELTA)


def _sgd(setup, mechanism, clip_norm=1.0):
    loss, params, images, labels, canary = setup
    return canaries.audit_dp_sgd_step(
        loss,
        params,
        images,
        labels,
        *canary,
        clip_norm=clip_norm,
        noise_multiplier=SIGMA,
        num_trials=TRIALS,
        key=jax.random.key(3),
        mechanism=mechanism,
        delta=DELTA,
    )


def test_claimed_epsilon_is_dp_accounting_called_directly():
    assert canaries.claimed_epsilon(SIGMA, DELTA) == pytest.approx(_accountant(SIGMA), rel=1e-9)
    assert canaries.claimed_epsilon(0.0, DELTA) == math.inf


def test_dp_sgd_correct_step_stays_below_accountant(setup):
    result = _sgd(setup, "correct")
    assert result.canary_norm > 3.0  # the canary is clipped: its contribution is exactly C
    assert result.consistent and 0.3 < result.epsilon_lower_bound < result.accountant_epsilon
    assert result.accountant_epsilon == pytest.approx(_accountant(SIGMA), rel=1e-6)
    assert result.trials == TRIALS
    # 1000 held-out trials can certify at most log(~500 / 3.7): above the claim, so it is tested.
    assert result.accountant_epsilon < result.max_detectable_epsilon < 5.5


@pytest.mark.parametrize("mechanism", ["no_noise", "wrong_scale", "no_clipping"])
def test_dp_sgd_broken_variants_are_caught(setup, mechanism):
    result = _sgd(setup, mechanism)
    assert not result.consistent
    assert result.epsilon_lower_bound > result.accountant_epsilon


def test_dp_fedavg_round_audit():
    params = {"w": jnp.zeros((20, 5)), "b": jnp.zeros(5)}
    results = {
        mechanism: canaries.audit_dp_fedavg_round(
            params,
            num_clients=5,
            clip_norm=0.5,
            noise_multiplier=SIGMA,
            num_trials=TRIALS,
            key=jax.random.key(4),
            mechanism=mechanism,
            delta=DELTA,
        )
        for mechanism in canaries.MECHANISMS
    }
    assert results["correct"].consistent and results["correct"].epsilon_lower_bound > 0.3
    for mechanism in ("no_noise", "wrong_scale", "no_clipping"):
        assert not results[mechanism].consistent, mechanism
    assert results["correct"].as_dict()["consistent"] is True


def test_invalid_arguments_name_the_field(setup):
    loss, params, images, labels, (canary, _) = setup
    kwargs = dict(clip_norm=1.0, noise_multiplier=1.0, num_trials=100, key=jax.random.key(0))
    with pytest.raises(ValueError, match="mechanism"):
        canaries.audit_dp_sgd_step(
            loss, params, images, labels, canary, 0, **kwargs, mechanism="bogus"
        )
    with pytest.raises(ValueError, match="noise_multiplier"):
        canaries.audit_dp_sgd_step(
            loss, params, images, labels, canary, 0, **{**kwargs, "noise_multiplier": 0.0}
        )
    with pytest.raises(ValueError, match="canary_image"):
        canaries.audit_dp_sgd_step(loss, params, images, labels, canary[:3], 0, **kwargs)
    with pytest.raises(ValueError, match="num_clients"):
        canaries.audit_dp_fedavg_round(params, num_clients=1, **kwargs)


@pytest.fixture(scope="module")
def run_audits():
    """One-run audits of 100 DP-SGD steps at q = 0.1, sigma = 2 (claim: epsilon 2.58)."""
    return {
        mechanism: canaries.audit_dp_sgd_run(
            num_canaries=2000,
            steps=100,
            sampling_rate=0.1,
            clip_norm=1.0,
            noise_multiplier=2.0,
            key=jax.random.key(6),
            mechanism=mechanism,
            delta=DELTA,
        )
        for mechanism in canaries.RUN_MECHANISMS
    }


def test_one_run_audit_of_the_real_code_stays_below_the_run_epsilon(run_audits):
    correct = run_audits["correct"]
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0)), 100
    )
    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(event)
    assert correct.accountant_epsilon == pytest.approx(acct.get_epsilon(DELTA), rel=1e-6)
    assert correct.consistent and correct.epsilon_lower_bound > 0.2
    assert correct.max_detectable_epsilon > correct.accountant_epsilon  # a violation would show


@pytest.mark.parametrize("mechanism", ["no_noise", "wrong_scale", "no_clipping", "no_subsampling"])
def test_one_run_audit_catches_broken_noise_clipping_and_sampling(run_audits, mechanism):
    assert not run_audits[mechanism].consistent, run_audits[mechanism]


# ---- audits of the code that trained: local DP-SGD (example, per-layer, patient) --------------


def _local(setup, mechanism, **kwargs):
    loss, params, images, labels, canary = setup
    audit = kwargs.pop("audit", canaries.audit_local_dp_step)
    return audit(
        loss,
        params,
        images,
        labels,
        *canary,
        clip_norm=1.0,
        noise_multiplier=SIGMA,
        num_trials=TRIALS,
        key=jax.random.key(3),
        mechanism=mechanism,
        delta=DELTA,
        **kwargs,
    )


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_local_dp_step_audit_stays_below_accountant(setup, method):
    result = _local(setup, "correct", method=method, microbatch_size=3)
    assert result.canary_norm > 3.0  # the canary is clipped
    assert result.consistent and 0.3 < result.epsilon_lower_bound < result.accountant_epsilon
    assert result.accountant_epsilon == pytest.approx(_accountant(SIGMA), rel=1e-6)
    assert result.accountant_epsilon < result.max_detectable_epsilon


@pytest.mark.parametrize("mechanism", ["no_noise", "wrong_scale", "no_clipping"])
def test_local_dp_step_audit_catches_broken_variants(setup, mechanism):
    result = _local(setup, mechanism)
    assert not result.consistent and result.epsilon_lower_bound > result.accountant_epsilon


@pytest.mark.parametrize("mechanism", canaries.MECHANISMS)
def test_per_layer_step_audit(setup, mechanism):
    result = _local(setup, mechanism, audit=canaries.audit_per_layer_dp_sgd_step)
    if mechanism == "correct":
        assert result.consistent and result.epsilon_lower_bound > 0.3
    else:
        assert not result.consistent, mechanism


def _patient(setup, mechanism, **kwargs):
    loss, params, images, labels, (canary, label) = setup
    # The canary patient: six aligned images (per-image clipping would let it move the sum 6C).
    canary_images = jnp.stack([canary * (1 + 0.05 * i) for i in range(6)])
    return canaries.audit_patient_dp_sgd_step(
        loss,
        params,
        images,
        labels,
        jnp.array([0, 0, 1, 2, 2, 3]),
        canary_images,
        jnp.full(6, label),
        clip_norm=1.0,
        noise_multiplier=SIGMA,
        num_trials=TRIALS,
        key=jax.random.key(3),
        mechanism=mechanism,
        delta=DELTA,
        **kwargs,
    )


@pytest.mark.parametrize("mechanism", canaries.PATIENT_MECHANISMS)
def test_patient_step_audit(setup, mechanism):
    result = _patient(setup, mechanism)
    if mechanism == "correct":
        assert result.consistent and result.epsilon_lower_bound > 0.3
        assert result.canary_norm > 6.0  # the patient's summed gradient, clipped to C once
    else:
        assert not result.consistent, mechanism
        assert result.epsilon_lower_bound > result.accountant_epsilon


def test_local_audits_run_the_function_local_update_runs(setup, monkeypatch):
    # Both the audit and LocalUpdate go through client.private_step_release.
    calls = []
    real = client.private_step_release

    def spy(grad_sum, *args, **kwargs):
        calls.append(grad_sum.unit)
        return real(grad_sum, *args, **kwargs)

    monkeypatch.setattr(client, "private_step_release", spy)
    loss, params, images, labels, canary = setup
    canaries.audit_local_dp_step(
        loss,
        params,
        images,
        labels,
        *canary,
        clip_norm=1.0,
        noise_multiplier=1.0,
        num_trials=8,
        key=jax.random.key(0),
    )
    assert calls and set(calls) == {"example"}
    calls.clear()
    _patient_small = canaries.audit_patient_dp_sgd_step(
        loss,
        params,
        images,
        labels,
        jnp.arange(6),
        canary[0][None],
        canary[1][None],
        clip_norm=1.0,
        noise_multiplier=1.0,
        num_trials=8,
        key=jax.random.key(0),
    )
    assert calls and set(calls) == {"patient"} and _patient_small.trials == 8
    calls.clear()
    model = registry.get_model("linear", input_shape=SHAPE, num_outputs=3)
    update = client.make_local_update(
        model.apply, "multiclass", local_steps=1, batch_size=2, client_lr=0.1, dp_clip_norm=1.0
    )
    update(params, images, labels, jnp.ones(6, bool), 6, jax.random.key(0))
    assert calls == ["example"]


def test_local_audit_arguments_name_the_field(setup):
    loss, params, images, labels, (canary, label) = setup
    kwargs = dict(clip_norm=1.0, noise_multiplier=1.0, num_trials=100, key=jax.random.key(0))
    with pytest.raises(ValueError, match="mechanism"):
        canaries.audit_local_dp_step(
            loss, params, images, labels, canary, label, **kwargs, mechanism="example_clipping"
        )
    with pytest.raises(ValueError, match="dp_method|method"):
        canaries.audit_local_dp_step(
            loss, params, images, labels, canary, label, **kwargs, method="loop"
        )
    with pytest.raises(ValueError, match="unit_ids"):
        canaries.audit_patient_dp_sgd_step(
            loss, params, images, labels, np.arange(5), canary[None], label[None], **kwargs
        )
    with pytest.raises(ValueError, match="canary_labels"):
        canaries.audit_patient_dp_sgd_step(
            loss,
            params,
            images,
            labels,
            np.arange(6),
            canary[None],
            jnp.zeros(2, jnp.int32),
            **kwargs,
        )
    with pytest.raises(ValueError, match="per_layer"):
        canaries.audit_per_layer_dp_sgd_step(
            loss, params, images, labels, canary, label, **kwargs, per_layer=False
        )
