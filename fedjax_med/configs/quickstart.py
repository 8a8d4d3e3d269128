"""Quickstart: six simulated hospitals train one model together, each under local DP-SGD.

    fedjax-med train --config quickstart --workdir runs/quickstart

The embedded synthetic benchmark (32x32 grayscale, 4 classes: normal tissue and three lesion
types; chance 0.25) has six hospitals with their own scanners, class mix and size. Each hospital
is one federated client (FedAvg, McMahan et al. 2017); in every round it runs 5 local DP-SGD steps
(Abadi et al. 2016: Poisson sampling with expected batch 64, per-example clipping to C = 1,
noise multiplier 1.5) on its own images, so each hospital's patients' images are protected by
that hospital's own epsilon (report.json: privacy.per_site_epsilon). Measured on 2 CPU cores:
test accuracy 0.64 at per-site epsilon 3.2 to 7.6 (delta 1e-4) in about 95 s.

Variants: ``configs/quickstart.py:central`` is the centralized, non-private baseline (0.92 in
about 30 s); ``configs/quickstart.py:tiny`` is a seconds-long smoke run of the centralized trainer.
``configs/quickstart.py:scatter`` is the same federated local DP-SGD (same sampling, noise and
steps, so the same per-site epsilon 3.2 to 7.6) on ScatterNet features with a linear model
(Tramer & Boneh 2021; GroupNorm, so no privacy is spent on statistics) at client learning rate
0.25: test accuracy 0.81, worst site 0.73, in 214 s wall time on a shared 2-core machine at load
average 2.5-3.9 (client learning rate 0.5: 0.78 / 0.72; 1: 0.73 / 0.68; 2: 0.69 / 0.65; the CNN
quickstart run beside them: 0.66 / 0.56).
``:scatter,smoke`` runs it in seconds.
"""

from fedjax_med.config import base, loading


def get_config(arg: str = ""):
    options = loading.parse_arg(
        arg, ("central", "tiny", "smoke", "scatter"), "configs/quickstart.py"
    )
    config = base.get_base_config()
    config.data.name = "synthetic"
    config.model.name = "small_cnn"
    if options & {"central", "tiny"}:
        # The centralized, non-private baseline on the pooled images.
        config.trainer = "central"
        config.data.normalization = "per_site"
        config.optimizer.name = "adam"
        config.optimizer.learning_rate = 2e-3
        config.optimizer.schedule = "cosine"
        config.train.batch_size = 64
        config.train.steps = 1500
        config.train.eval_every = 500
        config.train.checkpoint_every = 500
    else:
        config.trainer = "federated"
        config.data.normalization = "fixed"  # per-site statistics would not be covered by DP
        config.federated.partition.method = "by_site"  # one client per hospital
        config.federated.algorithm = "fedavg"
        config.federated.rounds = 60
        config.federated.local_steps = 5
        config.federated.client_batch_size = 64  # expected Poisson batch of local DP-SGD
        config.federated.client_lr = 2.0
        config.federated.eval_every = 20
        config.federated.checkpoint_every = 20

        config.privacy.enabled = True  # local DP-SGD inside every hospital
        config.privacy.clip_norm = 1.0
        config.privacy.noise_multiplier = 1.5
        config.privacy.delta = 1e-4
        if "scatter" in options:  # pip install 'fedjax_med[scatter]'
            config.model.name = "scatter_linear"
            config.federated.client_lr = 0.25
    if "smoke" in options:  # seconds: the quickstart's own federated local DP-SGD, shrunk
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 60
        config.federated.rounds = 2
        config.federated.local_steps = 2
        config.federated.client_batch_size = 8
        config.federated.eval_every = config.federated.checkpoint_every = 2
    if "tiny" in options:
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 60
        config.train.batch_size = 16
        config.train.steps = 6
        config.train.eval_every = 3
        config.train.checkpoint_every = 3
        config.train.log_every = 1
    return config
