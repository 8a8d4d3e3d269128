"""Evaluation over padded batches equals one unpadded call; groups equal metrics of the subset."""

import jax
import numpy as np
import pytest

from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import preprocess
from fedjax_med.models import registry
from fedjax_med.training import evaluate, metrics, parallel

N = 7
SHAPE = (4, 4, 1)
SITE_NAMES = ("a", "b", "c", "d")  # "d" has no examples
SEX = ("f", "m", "x")  # "x" has no examples


def make_case(task: str):
    rng = np.random.default_rng(0)
    num_classes = 3 if task == "multiclass" else 2
    labels = rng.integers(0, num_classes, N).astype(np.int32)
    labels[:num_classes] = np.arange(num_classes)  # every class present
    data = dataset_lib.ImageDataset(
        images=rng.integers(0, 256, (N, *SHAPE)).astype(np.uint8),
        labels=labels,
        sites=np.array([0, 0, 1, 2, 2, 2, 1], np.int32),
        patient_ids=np.arange(N),
        subgroups={"sex": np.array([0, 1, 1, 0, 1, 0, 0], np.int32)},
    )
    info = dataset_lib.DatasetInfo(
        name="toy",
        task=task,
        num_classes=num_classes,
        class_names=tuple(str(k) for k in range(num_classes)),
        site_names=SITE_NAMES,
        image_shape=SHAPE,
        subgroup_names={"sex": SEX},
    )
    dataset_lib.validate_dataset(data, info, "test")
    normalizer = preprocess.fit_normalizer(data, len(SITE_NAMES), method="per_site")
    model = registry.get_model("linear", input_shape=SHAPE, num_outputs=info.num_outputs)
    params = model.init(jax.random.key(1))
    return data, info, normalizer, model, params


@pytest.fixture(scope="module", params=["multiclass", "binary"])
def case(request):
    data, info, normalizer, model, params = make_case(request.param)
    predict = evaluate.make_predict_fn(model.apply, info.task)
    # Reference: one call on the whole split, no padding.
    probs, losses = predict(params, normalizer(data.images, data.sites), data.labels)
    return data, info, normalizer, predict, params, np.asarray(probs), np.asarray(losses)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 10])
def test_padded_batches_equal_one_unpadded_call(case, batch_size):
    data, _, normalizer, predict, params, want_probs, want_losses = case
    probs, losses = evaluate.predict_dataset(predict, params, data, normalizer, batch_size)
    assert probs.shape == want_probs.shape and losses.shape == (N,)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)


def test_sharded_placement_gives_the_same_predictions(case):
    data, info, normalizer, _, params, want_probs, want_losses = case
    dp = parallel.make_data_parallel(0)
    model = registry.get_model("linear", input_shape=SHAPE, num_outputs=info.num_outputs)
    predict = evaluate.make_predict_fn(model.apply, info.task, dp.replicated_sharding)
    probs, losses = evaluate.predict_dataset(
        predict, dp.replicate(params), data, normalizer, 4, place=dp.shard_batch
    )
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)


def test_losses_are_the_per_example_losses_of_the_probabilities(case):
    data, info, *_, probs, losses = case
    if info.task == "multiclass":
        want = -np.log(probs[np.arange(N), data.labels])
    else:
        want = -np.log(np.where(data.labels == 1, probs, 1.0 - probs))
    np.testing.assert_allclose(losses, want, rtol=1e-4)


def test_metrics_overall_per_site_per_subgroup(case):
    data, info, normalizer, predict, params, probs, losses = case
    result = evaluate.evaluate(predict, params, data, info, normalizer, batch_size=3)
    assert set(result) == {"metrics", "per_site", "per_subgroup", "site_summary"}

    def by_hand(idx):
        return metrics.classification_metrics(
            probs[idx], data.labels[idx], info.task, losses=losses[idx]
        )

    def assert_same(got, want):
        assert set(got) == set(want)
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)

    assert_same(result["metrics"], by_hand(np.arange(N)))
    assert result["metrics"]["num_examples"] == N
    # Only sites present, in code order.
    assert list(result["per_site"]) == ["a", "b", "c"]
    for code, name in enumerate(("a", "b", "c")):
        idx = np.flatnonzero(data.sites == code)
        assert_same(result["per_site"][name], by_hand(idx))
    assert [m["num_examples"] for m in result["per_site"].values()] == [2, 2, 3]
    assert list(result["per_subgroup"]) == ["sex"]
    assert list(result["per_subgroup"]["sex"]) == ["f", "m"]
    for code, name in enumerate(("f", "m")):
        idx = np.flatnonzero(data.subgroups["sex"] == code)
        assert_same(result["per_subgroup"]["sex"][name], by_hand(idx))
    accuracies = [m["accuracy"] for m in result["per_site"].values()]
    assert result["site_summary"] == pytest.approx(
        {
            "worst_accuracy": min(accuracies),
            "mean_accuracy": float(np.mean(accuracies)),
            "spread_accuracy": max(accuracies) - min(accuracies),
        }
    )


def test_one_site_has_no_summary(case):
    data, info, normalizer, predict, params, *_ = case
    one_site = data.take(np.flatnonzero(data.sites == 2))
    result = evaluate.evaluate(predict, params, one_site, info, normalizer, batch_size=3)
    assert list(result["per_site"]) == ["c"]
    assert result["site_summary"] == {}
    assert result["metrics"]["num_examples"] == 3


def test_prefixed():
    values = {"accuracy": 0.9, "loss": 1.25, "num_examples": 7}
    assert evaluate.prefixed(values, "test") == {
        "test_accuracy": 0.9,
        "test_loss": 1.25,
        "test_num_examples": 7,
    }
    assert list(evaluate.prefixed(values, "val")) == [
        "val_accuracy",
        "val_loss",
        "val_num_examples",
    ]
    assert evaluate.prefixed({}, "test") == {}
    assert values == {"accuracy": 0.9, "loss": 1.25, "num_examples": 7}  # input untouched
