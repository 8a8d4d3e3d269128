"""DP-SGD (Abadi et al. 2016) on the embedded synthetic multi-site data, example-level privacy.

    fedjax-med train --config dp_sgd --workdir runs/dp_sgd

Poisson sampling with expected batch 256 (q = 256 / N), per-example clipping to C = 1, Gaussian
noise calibrated so that the whole run is (epsilon = 8, delta = 1e-5)-DP under the RDP accountant
(``--config.privacy.accountant=pld`` for the tighter PLD). ``configs/dp_sgd.py:patient`` protects
patients instead of images: patients are sampled, at most 2 images each, and each patient's summed
gradient is clipped. The report's ``privacy`` object states the guarantee that was met.
"""

from fedjax_med.config import base, loading


def get_config(arg: str = ""):
    options = loading.parse_arg(arg, ("patient", "tiny"), "configs/dp_sgd.py")
    config = base.get_base_config()
    config.data.name = "synthetic"
    config.data.normalization = "fixed"  # per-site statistics would not be covered by DP
    config.model.name = "small_cnn"
    config.optimizer.name = "momentum"
    config.optimizer.learning_rate = 1.0
    config.optimizer.momentum = 0.9
    config.train.batch_size = 256
    config.train.steps = 400
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    config.train.log_every = 10

    config.privacy.enabled = True
    config.privacy.unit = "example"
    config.privacy.clip_norm = 1.0
    config.privacy.target_epsilon = 8.0
    config.privacy.delta = 1e-5
    config.privacy.accountant = "rdp"
    config.privacy.sampling = "poisson"
    config.privacy.method = "ghost"
    if "patient" in options:
        config.privacy.unit = "patient"
        config.privacy.max_images_per_patient = 2
        config.train.batch_size = 96  # expected patients per step
    if "tiny" in options:  # a seconds-long smoke run of the same mechanism
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 60
        config.train.batch_size = 16
        config.train.steps = 4
        config.train.eval_every = config.train.checkpoint_every = 2
    return config
