"""FedProx (Li et al. 2020) on strongly label-skewed clients (Dirichlet alpha = 0.1).

    fedjax-med train --config fedprox_noniid --workdir runs/fedprox_noniid

The synthetic hospitals' training images are re-split into 24 clients whose class mix follows
Dir(0.1) per class (Hsu et al. 2019): most clients see one or two classes. 8 clients per round,
20 local steps, proximal term mu = 0.01 keeps local models near the global one.
"""

from fedjax_med.config import base


def get_config(arg: str = ""):
    config = base.get_base_config()
    config.trainer = "federated"
    config.data.name = "synthetic"
    config.federated.partition.method = "dirichlet"
    config.federated.partition.num_clients = 24
    config.federated.partition.alpha = 0.1
    config.model.name = "small_cnn"
    config.federated.algorithm = "fedprox"
    config.federated.prox_mu = 0.01
    config.federated.rounds = 60
    config.federated.clients_per_round = 8
    config.federated.local_steps = 20
    config.federated.client_batch_size = 32
    config.federated.client_lr = 0.05
    config.federated.eval_every = 10
    config.federated.checkpoint_every = 20
    return config
