"""Poisoning: one of six hospitals backdoors FedAvg (Bagdasaryan et al. 2020); robust defences.

    fedjax-med train --config poisoning --workdir runs/poisoning
    fedjax-med train --config poisoning:krum --workdir runs/poisoning_krum

One hospital of six (``poisoning.fraction = 1/6``) stamps a 3x3 checkerboard on half of its
images, labels them class 0, and boosts its update by ``n / eta = 6`` so that it replaces the
global model (model replacement). Every round evaluates the clean validation accuracy and the
attack success (triggered non-target images read as class 0) into ``metrics.jsonl``;
``report.json`` gets both per round under ``poisoning``. The argument picks the server's rule
(``median``, ``trimmed_mean``, ``krum``, ``multi_krum``, ``bulyan`` with a seventh hospital,
``norm_bound``; f = 1), DP-FedAvg (``dp_fedavg``: client clipping and noise), or another attack
(``label_flip``, ``scale``, ``sign_flip``, ``little_is_enough``); ``tiny`` shrinks the run to
seconds. Options combine: ``poisoning:krum,label_flip,tiny``.
"""

from fedjax_med.config import base, loading

AGGREGATORS = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bound")
ATTACKS = ("label_flip", "scale", "sign_flip", "little_is_enough")


def get_config(arg: str = ""):
    options = loading.parse_arg(
        arg, ("tiny", "dp_fedavg", *AGGREGATORS, *ATTACKS), "configs/poisoning.py"
    )
    config = base.get_base_config()
    config.trainer = "federated"
    config.data.name = "synthetic"
    config.data.normalization = "fixed"  # the trigger's pixels mean the same at every site
    config.data.synthetic.num_sites = 6
    config.data.synthetic.examples_per_site = 400
    config.data.synthetic.image_size = 16
    config.model.name = "small_cnn"

    config.federated.algorithm = "fedavg"
    config.federated.partition.method = "by_site"
    config.federated.rounds = 20
    config.federated.local_steps = 10
    config.federated.client_batch_size = 32
    config.federated.client_lr = 0.05
    config.federated.eval_every = 1  # clean accuracy and attack success every round
    config.federated.checkpoint_every = 20

    config.poisoning.kind = "backdoor"
    config.poisoning.fraction = 1 / 6
    config.poisoning.target_label = 0
    config.poisoning.trigger_size = 3
    config.poisoning.poison_fraction = 0.5
    config.poisoning.boost = 0.0  # n / server_lr: model replacement

    config.robust_aggregation.num_byzantine = 1
    config.robust_aggregation.norm_bound = 0.5
    for name in AGGREGATORS:
        if name in options:
            config.robust_aggregation.method = name
    if "bulyan" in options:  # n >= 4f + 3
        config.data.synthetic.num_sites = 7
        config.poisoning.fraction = 1 / 7
    for name in ATTACKS:
        if name in options:
            config.poisoning.kind = name
    if "dp_fedavg" in options:
        config.federated.algorithm = "dp_fedavg"
        config.privacy.clip_norm = 0.5
        config.privacy.noise_multiplier = 0.1
        config.privacy.delta = 1e-3
    if "tiny" in options:
        config.data.synthetic.num_sites = max(config.data.synthetic.num_sites, 5)
        config.data.synthetic.examples_per_site = 60
        config.federated.rounds = 2
        config.federated.local_steps = 2
        config.federated.client_batch_size = 8
        config.federated.checkpoint_every = 2
    return config
