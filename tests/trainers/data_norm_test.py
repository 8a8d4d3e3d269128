"""ScatterNet with private DataNorm in the central trainer: the statistics' cost is composed
into the run's epsilon, the statistics are what the formula says, and they never train."""

import dp_accounting
import jax
import numpy as np
import pytest

from fedjax_med import randomness
from fedjax_med.config import loading
from fedjax_med.data import pipeline
from fedjax_med.models import scatternet
from fedjax_med.privacy import data_norm
from fedjax_med.trainers import central, dp_sgd, federated
from fedjax_med.training import setup

pytest.importorskip("kymatio")

NORM_NOISE = 6.0


def config_for(**privacy):
    overrides = {
        "data.cache_dir": "none",
        "data.synthetic.num_sites": 2,
        "data.synthetic.image_size": 16,
        "model.name": "scatter_linear",
        "model.kwargs.norm": "data",
        "model.kwargs.norm_clip": "(2.0,4.0)",
        "model.kwargs.norm_noise": NORM_NOISE,
        "train.steps": 3,
        "train.eval_every": 3,
        "train.checkpoint_every": 3,
        "privacy.noise_multiplier": 1.5,
        "privacy.target_epsilon": 0.0,
        "privacy.delta": 1e-4,
        **{f"privacy.{k}": v for k, v in privacy.items()},
    }
    return loading.load_config("dp_sgd:tiny", [f"--config.{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = config_for()
    workdir = str(tmp_path_factory.mktemp("datanorm"))
    report = central.train_and_evaluate(config, workdir, quiet=True)
    return config, workdir, report


def test_epsilon_composes_the_statistics_with_the_steps(run):
    _, _, report = run
    privacy = report["privacy"]
    assert privacy["preceding_noise_multipliers"] == [NORM_NOISE, NORM_NOISE]
    q, sigma = privacy["sampling_rate"], privacy["noise_multiplier"]
    steps = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 3
    )
    gaussian = dp_accounting.GaussianDpEvent(NORM_NOISE)
    composed = dp_accounting.ComposedDpEvent([gaussian, gaussian, steps])
    direct = dp_accounting.rdp.RdpAccountant().compose(composed).get_epsilon(1e-4)
    assert privacy["epsilon"] == pytest.approx(direct, rel=1e-6)
    alone = dp_accounting.rdp.RdpAccountant().compose(steps).get_epsilon(1e-4)
    assert privacy["epsilon"] > alone


def test_statistics_follow_the_formula_and_stay_frozen(run):
    config, workdir, _ = run
    experiment, state = central.restore_for_eval(workdir)
    stats = state.params["data_stats"]
    # The formula, recomputed here: clipped sums of per-example channel moments, then the same
    # noise (the run's DATA_NORM key), divided by N.
    train = experiment.splits.train
    images, _ = pipeline.gather(train, np.arange(len(train)), experiment.normalizer)
    first, second = jax.jit(scatternet.channel_moments)(images)
    ca, cb = 2.0, 4.0
    sum_a = (first * np.minimum(1, ca / np.linalg.norm(first, axis=1, keepdims=True))).sum(0)
    sum_b = (second * np.minimum(1, cb / np.linalg.norm(second, axis=1, keepdims=True))).sum(0)
    key = experiment.plan.randomness.key(randomness.DATA_NORM)
    mean, var = data_norm.release(sum_a, sum_b, len(train), ca, cb, NORM_NOISE, key)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-4, atol=1e-6)
    # Three DP-SGD steps later the statistics are those released before step 0, bit for bit.
    np.testing.assert_array_equal(stats["mean"], experiment.data_stats["mean"])
    np.testing.assert_array_equal(stats["var"], experiment.data_stats["var"])
    assert not np.array_equal(state.params["head"]["kernel"], 0.0)
    initial = central.restore(workdir).initial_params["data_stats"]
    np.testing.assert_array_equal(initial["mean"], stats["mean"])


def test_calibration_leaves_room_for_the_statistics():
    config = config_for(noise_multiplier=0.0, target_epsilon=4.0)
    splits, _, model = setup.build_data_and_model(config)
    plan = dp_sgd.make_plan(config, splits.train, 1, model)
    assert 0.9 * 4.0 < plan.ledger.epsilon(3) <= 4.0
    assert plan.ledger.preceding_noise_multipliers == (NORM_NOISE, NORM_NOISE)
    # Without the statistics the same target affords less noise.
    assert dp_sgd.make_plan(config, splits.train, 1).noise_multiplier < plan.noise_multiplier


def test_data_norm_refuses_patients_and_federated_runs():
    config = config_for(unit="patient")
    splits, _, model = setup.build_data_and_model(config)
    with pytest.raises(ValueError, match="privacy.unit='patient' must be 'example' with it"):
        dp_sgd.make_plan(config, splits.train, 1, model)
    config = config_for()
    config.trainer = "federated"
    with pytest.raises(ValueError, match="'model.kwargs.norm'='data' .* is for the central"):
        federated.build_plan(config)
    with pytest.raises(ValueError, match="'model.kwargs.norm'='batch' must be one of"):
        scatternet.scatter_linear(3, norm="batch")
