"""DP-FedAvg (McMahan et al. 2018): client-level differential privacy across simulated clinics.

    fedjax-med train --config dp_fedavg --workdir runs/dp_fedavg

Client-level DP protects whole participants, so it needs many of them: the six synthetic
hospitals' training images are split into 60 clinics (IID by patient); each round samples every
clinic independently with q = 0.25 (Poisson, what the accountant assumes), clips each clinic's
model delta to S = 0.5, adds N(0, z^2 S^2) to the sum and divides by the expected 15 clinics.
z is calibrated for (epsilon = 10, delta = 1e-3) over 40 rounds (delta < 1/60).
``--config.federated.adaptive_clipping=True`` adapts S to the median update norm (Andrew et al.
2021).
"""

from fedjax_med.config import base, loading


def get_config(arg: str = ""):
    options = loading.parse_arg(arg, ("tiny",), "configs/dp_fedavg.py")
    config = base.get_base_config()
    config.trainer = "federated"
    config.data.name = "synthetic"
    config.data.normalization = "fixed"
    config.federated.partition.method = "iid"
    config.federated.partition.num_clients = 60
    config.model.name = "small_cnn"
    config.federated.algorithm = "dp_fedavg"
    config.federated.rounds = 40
    config.federated.clients_per_round = 15  # expected cohort: q = 15 / 60
    config.federated.local_steps = 10
    config.federated.client_batch_size = 16
    config.federated.client_lr = 0.1
    config.federated.server_lr = 1.0
    config.federated.eval_every = 10
    config.federated.checkpoint_every = 10
    config.privacy.clip_norm = 0.5
    config.privacy.target_epsilon = 10.0
    config.privacy.delta = 1e-3
    config.privacy.accountant = "rdp"
    if "tiny" in options:
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 80
        config.federated.partition.num_clients = 12
        config.federated.clients_per_round = 4
        config.federated.rounds = 4
        config.federated.local_steps = 2
        config.federated.client_batch_size = 8
        config.federated.eval_every = 2
        config.federated.checkpoint_every = 2
        config.privacy.target_epsilon = 0.0
        config.privacy.noise_multiplier = 1.0
        config.privacy.delta = 1e-2
    return config
