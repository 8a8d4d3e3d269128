"""A trained run restored for the attacks: its parameters, per-example losses, pixel bounds."""

import jax
import numpy as np
import pytest

from fedjax_med.config import base, schema
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import preprocess
from fedjax_med.models import losses as losses_lib
from fedjax_med.reporting import runs
from fedjax_med.trainers import central, registry
from fedjax_med.trainers import run as run_lib

STEPS = 2


def tiny_config():
    config = base.get_base_config()
    config.data.cache_dir = "none"
    config.data.synthetic.num_sites = 3
    config.data.synthetic.examples_per_site = 30
    config.data.synthetic.image_size = 16
    config.model.name = "linear"
    config.optimizer.learning_rate = 0.05
    config.train.batch_size = 8
    config.train.eval_batch_size = 16  # below the train and test sizes: padded batches
    config.train.steps = STEPS
    config.train.eval_every = STEPS
    config.train.checkpoint_every = STEPS
    return schema.validate(config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    report = registry.train(tiny_config(), workdir, quiet=True)
    run, params = runs.restore(workdir)
    return report, run, params


@pytest.fixture(scope="module")
def by_hand_losses(trained):
    """Each split's per-example losses from one unpadded call of the model."""
    _, run, params = trained

    @jax.jit
    def example_losses(images, labels):
        logits = run.model.apply(params, images)
        return losses_lib.per_example_loss(logits, labels, run.splits.info.task)

    out = {}
    for split in ("train", "val", "test"):
        data = run.splits.split(split)
        images = run.normalizer(data.images, data.sites)
        out[split] = np.asarray(example_losses(images, data.labels))
    return out


def test_restore_returns_the_run_and_its_latest_params(trained):
    report, run, params = trained
    assert isinstance(run, run_lib.Run)
    assert run.trainer == "central" and not run.is_federated and run.step == STEPS
    assert params is run.params
    # The restored model scores the test split exactly as the finished run reported.
    test = runs.split_losses(run, params, "test")
    assert float(test.mean()) == pytest.approx(report["metrics"]["test_loss"], rel=1e-5)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_initial_params_are_the_trainers_initialisation(trained):
    _, run, params = trained
    initial = runs.initial_params(run)
    fresh = central.init_state(central.build_experiment(run.config)).params
    assert jax.tree.structure(initial) == jax.tree.structure(params)
    np.testing.assert_array_equal(flat(initial), flat(fresh))
    assert not np.allclose(flat(initial), flat(params))  # two training steps moved them


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_losses_are_every_examples_loss_in_order(trained, by_hand_losses, split):
    _, run, params = trained
    got = runs.split_losses(run, params, split)
    assert got.shape == (len(run.splits.split(split)),)
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    np.testing.assert_allclose(got, by_hand_losses[split], rtol=1e-5, atol=1e-6)


def test_loss_threshold_attack(trained):
    _, run, params = trained
    result = runs.loss_threshold_attack(run, params)
    assert set(result) == {
        "attack",
        "auc",
        "tpr_at_0.1%_fpr",
        "tpr_at_1%_fpr",
        "members",
        "nonmembers",
        "fpr",
        "tpr",
        "mean_member_loss",
        "mean_nonmember_loss",
    }
    member = runs.split_losses(run, params, "train")
    nonmember = runs.split_losses(run, params, "test")
    assert result["attack"] == "loss_threshold"
    assert (result["members"], result["nonmembers"]) == (member.size, nonmember.size)
    assert result["mean_member_loss"] == pytest.approx(float(member.mean()))
    assert result["mean_nonmember_loss"] == pytest.approx(float(nonmember.mean()))
    # AUC: the fraction of (member, non-member) pairs where the member has the lower loss.
    lower = member[:, None] < nonmember[None, :]
    tied = member[:, None] == nonmember[None, :]
    assert result["auc"] == pytest.approx(float(np.mean(lower + 0.5 * tied)))
    assert 0.0 <= result["tpr_at_0.1%_fpr"] <= result["tpr_at_1%_fpr"] <= 1.0


def test_pixel_bounds_fixed():
    train = _one_pixel_sites([0.0, 1.0])
    normalizer = preprocess.fit_normalizer(train, 2, method="fixed", mean=0.5, std=0.25)
    assert runs.pixel_bounds(normalizer, np.array([1, 0, 1])) == (-2.0, 2.0)


def test_pixel_bounds_per_site():
    normalizer = preprocess.Normalizer(
        mean=np.array([[0.25], [0.5], [0.75]], np.float32),
        std=np.array([[0.5], [0.25], [0.125]], np.float32),
        method="per_site",
    )
    # Site 0: [-0.5, 1.5]; site 1: [-2, 2]; site 2: [-6, 2].
    assert runs.pixel_bounds(normalizer, np.array([0])) == (-0.5, 1.5)
    assert runs.pixel_bounds(normalizer, np.array([0, 0, 1])) == (-2.0, 2.0)
    assert runs.pixel_bounds(normalizer, np.array([2, 0])) == (-6.0, 2.0)
    # The bounds are where the raw pixels 0 and 1 of those sites land.
    images = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1)
    for site in range(3):
        lo, hi = runs.pixel_bounds(normalizer, np.array([site]))
        got = normalizer(images, np.array([site, site])).ravel()
        np.testing.assert_allclose(got, [lo, hi], rtol=1e-6)


def test_pixel_bounds_of_the_runs_own_sites(trained):
    _, run, _ = trained
    train = run.splits.train
    lo, hi = runs.pixel_bounds(run.normalizer, train.sites)
    pixels = run.normalizer(train.images, train.sites)
    assert lo <= pixels.min() and pixels.max() <= hi


def _one_pixel_sites(values):
    n = len(values)
    return dataset_lib.ImageDataset(
        images=np.asarray(values, np.float32).reshape(n, 1, 1, 1),
        labels=np.zeros(n, np.int32),
        sites=np.arange(n),
        patient_ids=np.arange(n),
    )
