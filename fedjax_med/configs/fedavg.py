"""FedAvg (McMahan et al. 2017) across the six synthetic hospitals, one client per site.

    fedjax-med train --config fedavg --workdir runs/fedavg

Every hospital trains 10 local SGD steps of batch 32 per round, the server averages the models
weighted by examples. Swap the algorithm with ``--config.federated.algorithm=`` fedadam, fedyogi,
fedadagrad, fedavgm or scaffold; simulate more, smaller, label-skewed clients with
``--config.federated.partition.method=dirichlet --config.federated.partition.num_clients=32``.
"""

from fedjax_med.config import base, loading


def get_config(arg: str = ""):
    options = loading.parse_arg(arg, ("tiny",), "configs/fedavg.py")
    config = base.get_base_config()
    config.trainer = "federated"
    config.data.name = "synthetic"
    config.federated.partition.method = "by_site"
    config.model.name = "small_cnn"
    config.federated.algorithm = "fedavg"
    config.federated.rounds = 40
    config.federated.clients_per_round = 0
    config.federated.local_steps = 10
    config.federated.client_batch_size = 32
    config.federated.client_lr = 0.05
    config.federated.eval_every = 10
    config.federated.checkpoint_every = 10
    if "tiny" in options:
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 60
        config.federated.rounds = 3
        config.federated.local_steps = 2
        config.federated.client_batch_size = 8
        config.federated.eval_every = 2
        config.federated.checkpoint_every = 2
    return config
