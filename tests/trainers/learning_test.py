"""The synthetic benchmark is learnable by a small CNN and not by a linear model."""

import jax
import numpy as np
import pytest

from fedjax_med.config import base, schema
from fedjax_med.data import pipeline
from fedjax_med.trainers import central
from fedjax_med.training import evaluate


def train_accuracy(model_name: str, steps: int) -> float:
    config = base.get_base_config()
    config.data.cache_dir = "none"
    config.data.synthetic.num_sites = 4
    config.data.synthetic.examples_per_site = 400
    config.model.name = model_name
    config.optimizer.learning_rate = 2e-3
    config.train.steps = steps
    config.train.batch_size = 64
    schema.validate(config)
    experiment = central.build_experiment(config)
    info = experiment.splits.info
    state = central.init_state(experiment)
    step = central.make_train_step(experiment.model.apply, experiment.optimizer, info.task)
    batches = pipeline.ShuffledBatches(len(experiment.splits.train), 64, config.seed)
    for s in range(steps):
        images, labels = pipeline.gather(
            experiment.splits.train, batches.indices(s), experiment.normalizer
        )
        state, _ = step(state, images, labels)
    predict = evaluate.make_predict_fn(experiment.model.apply, info.task)
    result = evaluate.evaluate(
        predict, state.params, experiment.splits.test, info, experiment.normalizer, 256
    )
    assert np.isfinite(jax.tree.leaves(state.params)[0]).all()
    return result["metrics"]["accuracy"]


@pytest.fixture(scope="module")
def accuracies():
    return {"cnn": train_accuracy("small_cnn", 400), "linear": train_accuracy("linear", 400)}


def test_cnn_learns_the_task(accuracies):
    assert accuracies["cnn"] >= 0.6  # 4 classes: chance is 0.25


def test_cnn_beats_linear(accuracies):
    assert accuracies["cnn"] >= accuracies["linear"] + 0.2, accuracies
