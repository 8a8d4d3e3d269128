"""Tramer & Boneh 2021 DP-SGD recipes (end-to-end CNN, ScatterNet+linear, ScatterNet+CNN), eps 3.

Tramer and Boneh, "Differentially private learning needs better features (or much more data)",
ICLR 2021 (https://arxiv.org/abs/2011.11660), Fashion-MNIST hyperparameters of their code
(github.com/ftramer/Handcrafted-DP), for a MedMNIST-style ``.npz`` of Fashion-MNIST (or MNIST)::

    fedjax-med train --config dp_tramer_boneh:cnn \\
        --config.data.path=fashionmnist.npz --workdir runs/tb_cnn
    fedjax-med train --config dp_tramer_boneh:scatter_linear \\
        --config.data.path=fashionmnist.npz --workdir runs/tb_scatter_linear
    fedjax-med train --config dp_tramer_boneh:scatter_cnn \\
        --config.data.path=fashionmnist.npz --workdir runs/tb_scatter_cnn

The ``.npz`` holds ``train_images`` / ``train_labels``, ``val_*`` and ``test_*`` arrays, images
``uint8`` of shape ``(N, 28, 28)`` (the MedMNIST layout; from the public Fashion-MNIST files:
read the idx files with numpy, keep 60,000 train and 10,000 test images, and store a few
thousand of the training images as ``val_*``).

Published test accuracy at (epsilon 3, delta 1e-5), Fashion-MNIST [MNIST]:

========================  ===============  ================================================
variant                   published        hyperparameters (all: SGD momentum 0.9, C = 0.1)
========================  ===============  ================================================
``cnn``                   86.0% [98.1%]    batch 2048, lr 4, sigma 2.15, 40 epochs, tanh CNN
``scatter_linear``        89.7% [98.7%]    batch 8192, lr 16, sigma 4.05, GroupNorm(27)
``scatter_cnn``           89.0% [98.7%]    batch 2048, lr 4, sigma 2.15, 40 epochs, GroupNorm(27)
========================  ===============  ================================================

Steps are the epochs times ``60000 / batch`` (Fashion-MNIST's training set); ``scatter_linear``
runs until the ``(3, 1e-5)`` budget is spent (``privacy.target_epsilon`` stops it). The batch is
the logical batch: ``privacy.microbatch_size`` bounds the per-example work held at once. Poisson
sampling and the RDP accountant; Tramer and Boneh sampled fixed-size shuffled batches but
accounted them as Poisson, so the same noise gives the same epsilon here. Their own MNIST and
CIFAR-10 runs normalise ScatterNet features with private dataset statistics (DataNorm, noise 8)
instead of GroupNorm; ``:data_norm`` (with a ScatterNet variant) does the same
(``model.kwargs.norm = "data"``, :mod:`fedjax_med.privacy.data_norm`): the statistics' two
Gaussian releases are composed into the run's epsilon, and the ``(3, 1e-5)`` budget then stops
the steps a little earlier. The default uses GroupNorm (no privacy spent on statistics).
``:tiny`` (with any variant) is a seconds-long run on the embedded synthetic data.
"""

from fedjax_med.config import base, loading

VARIANTS = ("cnn", "scatter_linear", "scatter_cnn")
TRAIN_SIZE = 60_000  # Fashion-MNIST / MNIST training images
# variant: (model, batch, learning rate, noise multiplier, epochs)
RECIPES = {
    "cnn": ("small_cnn", 2048, 4.0, 2.15, 40),
    "scatter_linear": ("scatter_linear", 8192, 16.0, 4.05, 100),
    "scatter_cnn": ("scatter_cnn", 2048, 4.0, 2.15, 40),
}


def get_config(arg: str = ""):
    options = loading.parse_arg(
        arg, (*VARIANTS, "data_norm", "tiny"), "configs/dp_tramer_boneh.py"
    )
    chosen = [v for v in VARIANTS if v in options] or ["cnn"]
    if len(chosen) > 1:
        raise ValueError(f"configs/dp_tramer_boneh.py: choose one of {VARIANTS}, not {chosen}")
    model, batch, lr, sigma, epochs = RECIPES[chosen[0]]
    config = base.get_base_config()
    config.data.name = "medmnist"
    config.data.path = "fashionmnist.npz"
    config.data.normalization = "fixed"
    config.model.name = model
    config.optimizer.name = "momentum"
    config.optimizer.learning_rate = lr
    config.optimizer.momentum = 0.9
    config.train.batch_size = batch
    config.train.steps = epochs * TRAIN_SIZE // batch
    config.train.eval_every = config.train.checkpoint_every = max(config.train.steps // 10, 1)
    config.privacy.enabled = True
    config.privacy.clip_norm = 0.1
    config.privacy.noise_multiplier = sigma
    config.privacy.target_epsilon = 3.0
    config.privacy.delta = 1e-5
    config.privacy.accountant = "rdp"
    config.privacy.sampling = "poisson"
    config.privacy.microbatch_size = 256
    if "data_norm" in options:
        if not model.startswith("scatter"):
            raise ValueError("configs/dp_tramer_boneh.py: data_norm goes with a ScatterNet variant")
        config.model.kwargs.norm = "data"
        config.model.kwargs.norm_noise = 8.0  # their MNIST / CIFAR-10 DataNorm noise
    if "tiny" in options:
        config.data.name = "synthetic"
        config.data.path = ""
        config.data.synthetic.num_sites = 2
        config.data.synthetic.examples_per_site = 60
        config.train.batch_size = 32
        config.train.steps = 2
        config.train.eval_every = config.train.checkpoint_every = 2
        config.privacy.microbatch_size = 16
        config.privacy.target_epsilon = 0.0
        config.privacy.noise_multiplier = 1.0
        config.privacy.delta = 1e-3
    return config
