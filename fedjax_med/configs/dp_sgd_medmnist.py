"""DP-SGD on a MedMNIST ``.npz`` file (e.g. PneumoniaMNIST), example-level privacy.

    fedjax-med train --config dp_sgd_medmnist \
        --config.data.path=pneumoniamnist.npz --workdir runs/dp_medmnist

MedMNIST files carry no patient ids, so each image is its own patient and example-level privacy
is the only unit available. Noise is calibrated for (epsilon = 4, delta = 1e-5) with the PLD
accountant over the planned steps.
"""

from fedjax_med.config import base


def get_config(arg: str = ""):
    config = base.get_base_config()
    config.data.name = "medmnist"
    config.data.path = arg or "pneumoniamnist.npz"
    config.data.normalization = "fixed"
    config.model.name = "small_cnn"
    config.optimizer.name = "momentum"
    config.optimizer.learning_rate = 1.0
    config.train.batch_size = 256
    config.train.steps = 1000
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.privacy.enabled = True
    config.privacy.clip_norm = 1.0
    config.privacy.target_epsilon = 4.0
    config.privacy.delta = 1e-5
    config.privacy.accountant = "pld"
    return config
