"""A small CNN on a MedMNIST ``.npz`` file (e.g. pneumoniamnist.npz, chestmnist.npz).

    fedjax-med train --config medmnist --config.data.path=pneumoniamnist.npz \
        --workdir runs/medmnist

The task (binary, multi-class or multi-label, e.g. ChestMNIST's 14 findings) is read from the
label array. MedMNIST has no site or patient metadata: each image is its own patient and the
data is one site; partitioners simulate hospitals for federated runs.
"""

from fedjax_med.config import base


def get_config(arg: str = ""):
    config = base.get_base_config()
    config.data.name = "medmnist"
    config.data.path = arg or "pneumoniamnist.npz"
    config.data.normalization = "fixed"
    config.model.name = "small_cnn"
    config.optimizer.learning_rate = 1e-3
    config.train.batch_size = 128
    config.train.steps = 2000
    config.train.eval_every = 500
    return config
