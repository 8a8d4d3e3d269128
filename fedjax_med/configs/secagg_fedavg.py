"""FedAvg across the six synthetic hospitals with secure aggregation (Bonawitz et al. 2017).

    fedjax-med train --config secagg_fedavg --workdir runs/secagg_fedavg

Each round every hospital trains locally, clips its model delta per coordinate to 0.5, encodes
it in fixed point and submits it masked with pairwise and self masks (X25519 key agreement,
AES-CTR expansion, Shamir shares of the mask keys for dropout recovery): the server learns only
the weighted sum. The report's ``aggregation_cost`` compares bytes per client per round with the
plaintext upload. ``--config.secure_aggregation.method=secagg_plus`` masks with O(log n)
neighbours (Bell et al. 2020); ``additive`` shares among two non-colluding servers.
``configs/secagg_fedavg.py:ddp`` adds distributed DP: the clients add the noise, and the server
sees only the noisy sum.
"""

from fedjax_med.config import base, loading


def get_config(arg: str = ""):
    options = loading.parse_arg(arg, ("ddp", "tiny"), "configs/secagg_fedavg.py")
    config = base.get_base_config()
    config.trainer = "federated"
    config.data.name = "synthetic"
    config.model.name = "small_cnn"
    config.federated.algorithm = "fedavg"
    config.federated.rounds = 30
    config.federated.local_steps = 10
    config.federated.client_batch_size = 32
    config.federated.client_lr = 0.05
    config.federated.eval_every = 10
    config.federated.checkpoint_every = 10
    config.secure_aggregation.method = "secagg"
    config.secure_aggregation.clip = 0.5
    config.secure_aggregation.dropout_rate = 0.05  # Bell et al.: t and k tolerate 5% dropouts
    if "ddp" in options:
        # Distributed DP: every hospital adds discrete Gaussian noise to its quantised, L2-clipped
        # update; any 3 survivors together carry noise multiplier 1 (Kairouz et al. 2021).
        config.secure_aggregation.distributed_dp = "discrete_gaussian"
        config.privacy.clip_norm = 0.5
        config.privacy.noise_multiplier = 1.0
        config.privacy.delta = 1e-3
        config.data.normalization = "fixed"  # per-site statistics would not be covered by DP
    if "tiny" in options:  # a seconds-long smoke run of the same protocol
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 60
        config.federated.rounds = 2
        config.federated.local_steps = 2
        config.federated.client_batch_size = 8
        config.federated.eval_every = config.federated.checkpoint_every = 2
    return config
