"""FedAvg (McMahan et al. 2017) across the six synthetic hospitals, one client per site.

    fedjax-med train --config fedavg --workdir runs/fedavg

Every hospital trains 10 local SGD steps of batch 32 per round, the server averages the models
weighted by examples. Swap the algorithm with ``--config.federated.algorithm=`` fedadam, fedyogi,
fedadagrad, fedavgm or scaffold; simulate more, smaller, label-skewed clients with
``--config.federated.partition.method=dirichlet --config.federated.partition.num_clients=32``.

Per-site models (scanner shift is built into the synthetic sites), each site evaluated with its
own model on its own test images (``report.json`` ``per_site[site]["personal_test_*"]``):

    fedjax-med train --config fedavg:fedbn --workdir runs/fedbn   # FedBN, Li et al. 2021
    fedjax-med train --config fedavg:ditto --workdir runs/ditto   # Ditto, Li et al. 2021

``fedbn`` keeps every GroupNorm scale and bias at its site (a small GroupNorm ResNet, since the
small CNN has no normalisation layer); ``ditto`` trains a personal model per site with
``lambda = federated.ditto_lambda``.
"""

import ml_collections

from fedjax_med.config import base, loading


def get_config(arg: str = ""):
    options = loading.parse_arg(arg, ("tiny", "fedbn", "ditto"), "configs/fedavg.py")
    if {"fedbn", "ditto"} <= options:
        raise ValueError("configs/fedavg.py: choose one of the arguments 'fedbn' and 'ditto'")
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
    if "fedbn" in options:
        config.federated.algorithm = "fedbn"
        config.model.name = "resnet_gn"  # GroupNorm: the scales and biases FedBN keeps local
        config.model.kwargs = ml_collections.ConfigDict(
            {"stage_sizes": [1, 1], "width": 8, "num_groups": 4}
        )
    if "ditto" in options:
        config.federated.algorithm = "ditto"
        config.federated.ditto_lambda = 0.1
    if "tiny" in options:
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 60
        config.federated.rounds = 3
        config.federated.local_steps = 2
        config.federated.client_batch_size = 8
        config.federated.eval_every = 2
        config.federated.checkpoint_every = 2
    return config
