"""Quickstart: a small tanh CNN on the embedded synthetic multi-site imaging benchmark.

    fedjax-med train --config configs/quickstart.py --workdir runs/quickstart

Six simulated hospitals, 32x32 grayscale images, 4 classes (normal tissue and three lesion
types; chance 0.25). Expected on 2 CPU cores: test accuracy ~0.9 in well under 3 minutes (see
the README for the measured number). ``configs/quickstart.py:tiny`` shrinks everything to a few
seconds for smoke tests.
"""

from fedjax_med.config import base


def get_config(arg: str = ""):
    config = base.get_base_config()
    config.data.name = "synthetic"
    config.model.name = "small_cnn"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "cosine"
    config.train.batch_size = 64
    config.train.steps = 1500
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    if arg == "tiny":
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 60
        config.train.batch_size = 16
        config.train.steps = 6
        config.train.eval_every = 3
        config.train.checkpoint_every = 3
        config.train.log_every = 1
    elif arg:
        raise ValueError(f"configs/quickstart.py: unknown argument {arg!r} (allowed: 'tiny')")
    return config
