"""De et al. 2022 DP-SGD recipe: WRN-16-4 with augmentation multiplicity and EMA, CIFAR-10 format.

De, Berrada, Hayes, Smith, Balle, "Unlocking high-accuracy differentially private image
classification through scale", 2022 (https://arxiv.org/abs/2204.13650), CIFAR-10 from scratch
with WRN-16-4 (weight standardisation, GroupNorm 16 groups), for a MedMNIST-style ``.npz`` of
CIFAR-10 (``train_images`` ``(N, 32, 32, 3)`` ``uint8``, ``train_labels``, ``val_*``,
``test_*``)::

    fedjax-med train --config dp_de_wrn --config.data.path=cifar10.npz --workdir runs/de_wrn
    fedjax-med train --config dp_de_wrn:eps1 --config.data.path=cifar10.npz --workdir runs/de1

Published test accuracy of WRN-16-4 at delta 1e-5: 79.5% at epsilon 8 (and 56.8% at epsilon 1),
with batch 4096, augmentation multiplicity 16 (random crops of reflection-padded images, shift
up to 4, and horizontal flips), clipping norm 1, SGD without momentum at learning rate 4, noise
multiplier 3, EMA of the parameters with decay 0.999 (``test_accuracy_ema`` is their number), and
2468 steps at epsilon 8 (875 at epsilon 1). The batch is the logical batch;
``privacy.microbatch_size`` bounds the per-example work held at once (16 views each).
``:tiny`` is a seconds-long run on the embedded synthetic data.
"""

from fedjax_med.config import base, loading

# epsilon: steps at noise multiplier 3 and batch 4096 of 50,000 images.
STEPS = {"eps8": (8.0, 2468), "eps1": (1.0, 875)}


def get_config(arg: str = ""):
    options = loading.parse_arg(arg, (*STEPS, "tiny"), "configs/dp_de_wrn.py")
    budgets = [b for b in STEPS if b in options] or ["eps8"]
    if len(budgets) > 1:
        raise ValueError(f"configs/dp_de_wrn.py: choose one of {tuple(STEPS)}, not {budgets}")
    epsilon, steps = STEPS[budgets[0]]
    config = base.get_base_config()
    config.data.name = "medmnist"
    config.data.path = "cifar10.npz"
    config.data.normalization = "fixed"
    config.model.name = "wrn_16_4"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 4.0
    config.train.batch_size = 4096
    config.train.steps = steps
    config.train.eval_every = config.train.checkpoint_every = 250
    config.train.ema_decay = 0.999
    config.privacy.enabled = True
    config.privacy.clip_norm = 1.0
    config.privacy.noise_multiplier = 3.0
    config.privacy.target_epsilon = epsilon
    config.privacy.delta = 1e-5
    config.privacy.augmult = 16
    config.privacy.augmentations = "flip,shift"
    config.privacy.augment_shift = 4
    config.privacy.microbatch_size = 64
    if "tiny" in options:
        config.data.name = "synthetic"
        config.data.path = ""
        config.data.synthetic.num_sites = 2
        config.data.synthetic.examples_per_site = 40
        config.data.synthetic.image_size = 16
        config.model.name = "wide_resnet"
        config.model.kwargs.depth = 10
        config.model.kwargs.width_factor = 1
        config.model.kwargs.num_groups = 4
        config.train.batch_size = 16
        config.train.steps = 2
        config.train.eval_every = config.train.checkpoint_every = 2
        config.privacy.augmult = 2
        config.privacy.microbatch_size = 8
        config.privacy.target_epsilon = 0.0
        config.privacy.noise_multiplier = 1.0
        config.privacy.delta = 1e-3
    return config
