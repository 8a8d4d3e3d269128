"""DP-SGD in the trainer: the report proves the guarantee, budgets stop runs, resume is exact."""

import json
import math
import os

import dp_accounting
import flax.serialization
import jax
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_med import randomness
from fedjax_med.config import base, schema
from fedjax_med.data import pipeline, sources
from fedjax_med.models import losses
from fedjax_med.privacy import claim as claim_lib
from fedjax_med.privacy import clipping, noise, sampling
from fedjax_med.trainers import central, dp_sgd
from fedjax_med.training import checkpoint, parallel
from fedjax_med.training import workdir as workdir_lib

PRIVACY_KEYS = (
    "epsilon",
    "delta",
    "accountant",
    "noise_multiplier",
    "sampling_rate",
    "steps",
    "clip_norm",
    "unit",
    "noise_seed_mode",
)


def dp_config(**privacy):
    config = base.get_base_config()
    config.data.cache_dir = "none"
    config.data.normalization = "fixed"
    config.data.synthetic.num_sites = 3
    config.data.synthetic.examples_per_site = 120
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.5
    config.train.batch_size = 32
    config.train.eval_batch_size = 128
    config.train.steps = 6
    config.train.eval_every = 3
    config.train.checkpoint_every = 3
    config.train.num_devices = 1
    config.privacy.enabled = True
    config.privacy.noise_multiplier = 1.0
    config.privacy.delta = 1e-4
    for k, v in privacy.items():
        config.privacy[k] = v
    return schema.validate(config)


def direct_epsilon(sigma, q, steps, delta):
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dp"))
    return workdir, central.train_and_evaluate(dp_config(), workdir, quiet=True)


def test_report_privacy_matches_dp_accounting(dp_run):
    _, report = dp_run
    privacy = report["privacy"]
    for key in PRIVACY_KEYS:
        assert key in privacy, key
    assert privacy["unit"] == "example" and privacy["noise_seed_mode"] == "reproducible"
    assert privacy["steps"] == 6 and privacy["clip_norm"] == 1.0
    n_train = privacy["num_units"]
    assert privacy["sampling_rate"] == pytest.approx(32 / n_train)
    expected = direct_epsilon(1.0, 32 / n_train, 6, 1e-4)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-3)


def test_epsilon_logged_at_evaluations(dp_run):
    workdir, report = dp_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    eps = [r["epsilon"] for r in records if "epsilon" in r]
    assert len(eps) == 2 and eps[0] < eps[1] == pytest.approx(report["privacy"]["epsilon"])
    assert all("train_loss" not in r for r in records)  # not covered by the DP guarantee
    assert 0.0 <= records[0]["train_clipped_fraction"] <= 1.0


def test_resume_keeps_the_ledger(dp_run, tmp_path):
    workdir, full = dp_run
    central.train_and_evaluate(dp_config(), str(tmp_path), quiet=True, stop_at_step=3)
    resumed = central.train_and_evaluate(dp_config(), str(tmp_path), resume=True, quiet=True)
    assert resumed["privacy"]["steps"] == 6
    assert resumed["privacy"]["epsilon"] == pytest.approx(full["privacy"]["epsilon"])
    _, a = central.restore_for_eval(workdir)
    _, b = central.restore_for_eval(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_budget_stops_the_run(tmp_path):
    one_step = direct_epsilon(1.0, 32 / 250, 1, 1e-4)
    three_steps = direct_epsilon(1.0, 32 / 250, 3, 1e-4)
    # A target between the epsilon of 2 and of 3 steps (N ~ 250 here; exact N read below).
    config = dp_config(target_epsilon=(one_step + three_steps) / 2)
    report = central.train_and_evaluate(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    assert privacy["stopped_by_budget"] is True
    assert privacy["epsilon"] <= privacy["target_epsilon"]
    assert 1 <= privacy["steps"] < 6
    q = privacy["sampling_rate"]
    over = direct_epsilon(1.0, q, privacy["steps"] + 1, 1e-4)
    assert over > privacy["target_epsilon"]  # one more step would have passed the target


def test_calibrated_run_meets_target(tmp_path):
    config = dp_config(noise_multiplier=0.0, target_epsilon=3.0, accountant="pld")
    report = central.train_and_evaluate(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    assert privacy["steps"] == 6
    assert privacy["epsilon"] <= 3.0
    assert privacy["accountant"] == "pld"


def test_patient_level_accounts_over_patients(tmp_path):
    report = central.train_and_evaluate(
        dp_config(unit="patient", max_images_per_patient=2), str(tmp_path), quiet=True
    )
    privacy = report["privacy"]
    assert privacy["unit"] == "patient"
    config = dp_config()
    train = sources.load_splits(config.data, config.seed).train
    patients = {(int(s), int(p)) for s, p in zip(train.sites, train.patient_ids, strict=True)}
    assert privacy["num_units"] == len(patients) < len(train)
    assert privacy["sampling_rate"] == pytest.approx(32 / privacy["num_units"])
    assert "patient" in privacy["guarantee"]


def test_secure_noise_seed(tmp_path):
    a = central.train_and_evaluate(dp_config(noise_seed="secure"), str(tmp_path / "a"), quiet=True)
    central.train_and_evaluate(dp_config(noise_seed="secure"), str(tmp_path / "b"), quiet=True)
    assert a["privacy"]["noise_seed_mode"] == "secure"
    _, sa = central.restore_for_eval(str(tmp_path / "a"))
    _, sb = central.restore_for_eval(str(tmp_path / "b"))
    leaf_a, leaf_b = jax.tree.leaves(sa.params)[0], jax.tree.leaves(sb.params)[0]
    assert not np.array_equal(leaf_a, leaf_b)  # same seed, different (unpredictable) noise


def test_no_noise_infinite_clip_equals_nonprivate_step():
    config = dp_config(enabled=False)
    experiment = central.build_experiment(config)
    model, info = experiment.model, experiment.splits.info
    params = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 1)).astype(np.float32)
    labels = rng.integers(0, 4, 8).astype(np.int32)
    tx = optax.sgd(0.1)
    nonprivate = central.make_train_step(model.apply, tx, info.task)
    state = central.init_state(experiment).replace(params=params, opt_state=tx.init(params))
    expected, _ = nonprivate(state, images, labels)
    loss_fn = losses.example_loss_fn(model.apply, info.task)
    total, _ = clipping.clipped_grad_sum(loss_fn, clip_norm=math.inf)(
        params, images, labels, np.ones(8, bool)
    )
    mean_grad = jax.tree.map(lambda g: g / 8, total)
    updates, _ = tx.update(mean_grad, tx.init(params), params)
    got = optax.apply_updates(params, updates)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), expected.params, got
    )


def test_noise_scale_decides_learning(tmp_path):
    def run(sigma, name):
        config = dp_config(noise_multiplier=sigma, clip_norm=1.0, delta=1e-4)
        config.unlock()
        config.data.synthetic.num_sites = 4
        config.data.synthetic.examples_per_site = 400
        config.optimizer.name = "sgd"
        config.optimizer.learning_rate = 2.0
        config.train.batch_size = 128
        config.train.steps = 120
        config.train.eval_every = 120
        config.train.checkpoint_every = 120
        return central.train_and_evaluate(schema.validate(config), str(tmp_path / name), quiet=True)

    moderate = run(0.7, "moderate")["metrics"]["test_accuracy"]
    huge = run(1000.0, "huge")["metrics"]["test_accuracy"]
    assert moderate >= 0.55, moderate
    assert huge <= 0.45, huge  # 4 classes with unequal prevalence: near chance


def test_shuffle_run_calibrates_in_its_own_mode_and_trains_every_step(tmp_path):
    # Before: calibration used the Poisson event, so a shuffle run with a target got a sigma
    # whose shuffle epsilon exceeded the target and the ledger stopped it at step 0.
    config = dp_config(sampling="shuffle", noise_multiplier=0.0, target_epsilon=8.0)
    report = central.train_and_evaluate(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    assert privacy["steps"] == config.train.steps
    n, b = privacy["num_units"], config.train.batch_size
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        n, b, dp_accounting.GaussianDpEvent(privacy["noise_multiplier"])
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, config.train.steps))
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(config.privacy.delta))
    assert privacy["epsilon"] <= 8.0


# ---- attacks on the claim, as an adversary holding the run's files would try ------------


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("secure"))
    config = dp_config(noise_seed="secure")
    return workdir, config, central.train_and_evaluate(config, workdir, quiet=True)


def _checkpointed_noise_key(workdir, config):
    experiment = central.build_experiment(config)
    template = dp_sgd.secret_free(central.init_state(experiment), experiment.plan)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, _ = ckpt.restore(ckpt.latest_step(), template)
    ckpt.close()
    return np.asarray(jax.random.key_data(optax.tree_utils.tree_get(state.opt_state, "rng_key")))


def test_secure_checkpoint_holds_no_noise_key(secure_run):
    workdir, config, _ = secure_run
    assert not _checkpointed_noise_key(workdir, config).any()


def test_reproducible_checkpoint_holds_its_key_and_says_so(tmp_path):
    config = dp_config()
    report = central.train_and_evaluate(config, str(tmp_path), quiet=True)
    assert _checkpointed_noise_key(str(tmp_path), config).any()
    assert report["privacy"]["noise_seed_mode"] == "reproducible"
    assert "no guarantee" in report["privacy"]["randomness"]
    assert "no guarantee against anyone who holds the seed" in report["privacy"]["guarantee"]


def test_secure_batches_are_not_the_seeds_batches():
    # The attack: recompute step t's batch as default_rng([seed, t]) from the published seed.
    public = sampling.PoissonSampler(1000, 0.1, seed=0)
    secret = sampling.PoissonSampler(
        1000, 0.1, seed=0, randomness=randomness.Randomness("secure", 0)
    )
    for step in range(3):
        guess = public.sample(step).chunks[0]
        actual = secret.sample(step).chunks[0]
        assert not np.array_equal(guess.indices[guess.mask], actual.indices[actual.mask])


def test_secure_run_is_not_regenerated_from_the_seed(secure_run, tmp_path):
    # The attack: rerun the published config in reproducible mode and compare the models.
    workdir, config, _ = secure_run
    replay = dp_config()
    central.train_and_evaluate(replay, str(tmp_path), quiet=True)
    _, secure_state = central.restore_for_eval(workdir)
    _, replay_state = central.restore_for_eval(str(tmp_path))
    diffs = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.abs(a - b).max()), secure_state.params, replay_state.params
        )
    )
    assert max(diffs) > 1e-3


def test_report_privacy_is_a_typed_claim_with_its_threat_model(secure_run):
    _, config, report = secure_run
    privacy = report["privacy"]
    claim = claim_lib.PrivacyClaim.from_report(json.loads(json.dumps(privacy)))
    assert claim.mechanism == "dp_sgd"
    assert claim.unit == "example" and claim.relation == "add_or_remove_one"
    assert claim.randomness_mode == "secure" and privacy["noise_seed_mode"] == "secure"
    assert claim.epsilon == privacy["epsilon"] and claim.trusted and claim.adversary
    assert any("clipped fraction" in item for item in claim.released_outside)
    assert claim.to_report()["guarantee"] == privacy["guarantee"]


def test_resume_with_changed_noise_is_refused(tmp_path):
    # The attack: 3 steps at sigma 5, then resume at sigma 0.5 and batch 32 under the old ledger.
    workdir = str(tmp_path)
    central.train_and_evaluate(dp_config(noise_multiplier=5.0), workdir, quiet=True, stop_at_step=3)
    changed = dp_config(noise_multiplier=0.5)
    with pytest.raises(workdir_lib.WorkdirError, match="privacy.noise_multiplier"):
        central.train_and_evaluate(changed, workdir, resume=True, quiet=True)
    report = central.train_and_evaluate(
        dp_config(noise_multiplier=5.0), workdir, resume=True, quiet=True
    )
    assert report["privacy"]["noise_multiplier"] == 5.0


def test_resumed_ledger_must_match_the_plan():
    plan = dp_sgd.budget.PrivacyLedger(
        noise_multiplier=5.0, sampling_rate=0.1, delta=1e-5, target_epsilon=1.0
    )
    other = dp_sgd.budget.PrivacyLedger(
        noise_multiplier=0.5, sampling_rate=0.2, delta=1e-5, target_epsilon=1.0
    )
    dp_sgd.check_resumed_ledger(plan, plan)
    with pytest.raises(ValueError, match="noise_multiplier.*sampling_rate"):
        dp_sgd.check_resumed_ledger(plan, other)


# ---------------------------------------------------------------- the utility recipe


def recipe_config(**privacy):
    config = dp_config(**privacy)
    config.data.synthetic.num_sites = 2
    config.data.synthetic.examples_per_site = 60
    config.data.synthetic.image_size = 16
    config.model.name = "mlp"
    config.model.kwargs.hidden = (8,)
    config.train.steps = 4
    config.train.eval_every = config.train.checkpoint_every = 2
    return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A model pretrained (non-privately) on another synthetic task: 3 classes, seed 1."""
    config = recipe_config(enabled=False)
    config.seed = 1
    config.data.synthetic.num_classes = 3
    config.train.steps = 2
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    central.train_and_evaluate(schema.validate(config), workdir, quiet=True)
    params = central.restore(workdir).params
    path = os.path.join(workdir, "params.msgpack")
    with open(path, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))
    return workdir, path, params


@pytest.fixture(scope="module")
def recipe_run(pretrained, tmp_path_factory):
    """Fine-tunes the head privately (4 classes) with augmult K = 3 and EMA / Polyak averages."""
    config = recipe_config(augmult=3)
    config.model.init_from = pretrained[1]
    config.train.trainable = "head"
    config.train.ema_decay = 0.9
    config.train.polyak_start = 1
    config = schema.validate(config)
    workdir = str(tmp_path_factory.mktemp("recipe"))
    return config, central.train_and_evaluate(config, workdir, quiet=True), workdir


def test_augmult_and_averages_keep_the_k1_epsilon_of_dp_accounting(recipe_run):
    config, report, _ = recipe_run
    privacy = report["privacy"]
    assert privacy["steps"] == config.train.steps and privacy["noise_multiplier"] == 1.0
    expected = direct_epsilon(1.0, privacy["sampling_rate"], config.train.steps, 1e-4)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_averages_are_reported_beside_the_raw_parameters(recipe_run):
    _, report, _ = recipe_run
    for split, metrics in (("test", report["metrics"]), ("val", report["val_metrics"])):
        for name in ("ema", "polyak"):
            assert 0.0 <= metrics[f"{split}_accuracy_{name}"] <= 1.0
            assert f"{split}_auroc_{name}" in metrics


def test_augmult_without_dp_sgd_is_refused():
    with pytest.raises(schema.ConfigError, match="'privacy.augmult'=2 .* needs privacy.enabled"):
        dp_config(augmult=2, enabled=False)


def test_fine_tuning_the_head_leaves_the_rest_bit_identical(pretrained, recipe_run):
    _, _, before = pretrained
    after = central.restore(recipe_run[2]).params
    np.testing.assert_array_equal(after["Dense_0"]["kernel"], before["Dense_0"]["kernel"])
    np.testing.assert_array_equal(after["Dense_0"]["bias"], before["Dense_0"]["bias"])
    assert after["Dense_1"]["kernel"].shape == (8, 4) != before["Dense_1"]["kernel"].shape
    initial = central.init_state(central.build_experiment(recipe_run[0])).params
    assert not np.array_equal(after["Dense_1"]["kernel"], initial["Dense_1"]["kernel"])


def test_init_from_a_workdir_equals_init_from_its_msgpack(pretrained, recipe_run):
    config = ml_collections.ConfigDict(recipe_run[0].to_dict())
    config.model.init_from = pretrained[0]
    from_workdir = central.init_state(central.build_experiment(config)).params
    np.testing.assert_array_equal(
        from_workdir["Dense_0"]["kernel"], pretrained[2]["Dense_0"]["kernel"]
    )


def test_accumulated_microbatches_equal_one_shot_and_noise_is_added_once():
    """A logical batch in microbatches of 8 (accumulated by ``lax.scan``) takes the step of the
    one-shot clipped sum plus one Gaussian draw of std ``sigma C``, divided by the logical ``L``.
    """
    config = recipe_config(microbatch_size=8, method="vmap")
    experiment = central.build_experiment(config)
    plan, state = experiment.plan, central.init_state(experiment)
    after = central.make_step_runner(experiment, parallel.make_data_parallel(1))(state, 0)[0]
    one_shot = ml_collections.ConfigDict(config.to_dict())
    one_shot.privacy.microbatch_size = 0
    grad_sum = dp_sgd.make_grad_sum_fn(one_shot, experiment.model.apply, "multiclass", plan)
    total = None
    chunks = plan.sampler.sample(0).chunks
    for chunk in chunks:
        x, y = pipeline.gather(experiment.splits.train, chunk.indices, experiment.normalizer)
        indices = np.asarray(chunk.indices, np.int32)
        chunk_sum, _ = grad_sum(state.params, x, y, chunk.mask, chunk.mask, indices, np.int32(0))
        total = dp_sgd.add_trees(total, chunk_sum)
    assert plan.expected_batch_size > 3 * 8 and sum(int(c.mask.sum()) for c in chunks) > 16
    # The first step's noise key: the second half of a split of the plan's key (dp_aggregate).
    release = noise.privatize_sum(
        total, jax.random.split(plan.noise_key)[1], 1.0, 1.0, plan.expected_batch_size
    )
    lr = config.optimizer.learning_rate
    expected = jax.tree.map(lambda p, r: p - lr * r, state.params, release)
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
