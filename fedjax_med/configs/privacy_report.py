"""Privacy report: one small task trained under seven settings, each attacked and audited.

    fedjax-med report --config privacy_report --workdir runs/report

The task is the embedded synthetic benchmark (four hospitals, 16x16 grayscale, 4 classes) with a
small CNN. Settings (``config.report.settings``; add, drop or change any with ordinary config
fields):

* ``central``: pooled data, non-private (Adam, long enough to overfit a little);
* ``fedavg``: FedAvg across the four hospitals, no defence;
* ``secagg``: the same FedAvg, the server sees only the secure sum of each round;
* ``dp_sgd_eps1``, ``dp_sgd_eps4``, ``dp_sgd_eps16``: centralized DP-SGD calibrated to these
  example-level epsilons (delta 1e-5, Poisson sampling, clipping C = 1);
* ``dp_sgd_patient``, ``dp_sgd_per_layer``: DP-SGD at epsilon 4, per patient (at most two
  images each, clipped together) and with per-layer clipping;
* ``local_dp_sgd``: DP-SGD inside every hospital (sigma 1, each site's own epsilon), then FedAvg;
* ``dp_fedavg``: DP-FedAvg over 40 clinics (client-level epsilon 10, delta 1e-3).

Each setting is attacked with membership inference (loss threshold, LiRA with 8 shadow models
trained together under vmap) and gradient inversion of what its server receives in the first
round. DP settings get a canary audit of their own release code (and central DP-SGD a one-run
audit of the whole run); the DP-SGD code is also audited broken (no noise, noise 10x too small,
every canary in every step) for contrast.

Poisoning (``config.report.poisoning``): one of six hospitals plants a backdoor (Bagdasaryan et
al. 2020: trigger, target class 0, update boosted for model replacement) against no defence, the
coordinate-wise median, Krum, norm bounding and DP-FedAvg, beside the same federation without
an attacker; each reports clean accuracy and attack success per round. The whole default,
poisoning included, took 5 min 41 s on 2 idle CPU cores. ``:gpu`` is the larger setting
(32x32 images, more data, steps, shadows and audit trials) for an accelerator. ``:tiny`` is a
first look in under a minute (central, fedavg and dp_sgd_eps1 on a tiny task; 36 s on 2 idle
cores) and ``:smoke`` every setting on that task; both compile without XLA's optimisation passes
(``report.fast_compile``).

``:segmentation`` is the report on a lesion segmentation task instead (the synthetic sites'
lesion masks, a depth-1 U-Net of width 4, 16x16 images, Dice + cross-entropy; seconds-long like
``:tiny``): ``central``, ``fedavg`` and ``dp_sgd_eps1``, no poisoning. Membership inference adds
the threshold on the per-example soft Dice loss (``membership.dice_threshold``; LiRA scores the
image's mean per-pixel logit confidence) and inversion reconstructs the victim's image from its
update given its mask; each setting's ``utility`` adds ``test_dice``.

``:recipe`` (with any of the above; not in the default report, which stays under ten minutes)
adds two settings of the DP-SGD utility recipe at epsilon 4, attacked and audited like the
others: ``dp_sgd_recipe`` (augmentation multiplicity K = 4 and an EMA of the parameters, De et
al. 2022; the same epsilon as ``dp_sgd_eps4``, attacks see the raw parameters) and
``dp_scatter_linear`` (ScatterNet features + GroupNorm + a linear model, Tramer & Boneh 2021).
"""

from fedjax_med.config import base, loading


def dp_sgd(epsilon: float, **privacy) -> dict:
    return {
        "trainer": "central",
        "optimizer": {"name": "momentum", "learning_rate": 0.5, "momentum": 0.9},
        "privacy": {
            "enabled": True,
            "target_epsilon": epsilon,
            "delta": 1e-5,
            "clip_norm": 1.0,
            "sampling": "poisson",
            "method": "vmap",
            **privacy,
        },
        "train": {"batch_size": 256, "steps": 300},
    }


def recipe_settings() -> dict:
    """``:recipe``'s settings: DP-SGD with augmult and EMA, and ScatterNet + linear, epsilon 4."""
    return {
        "dp_sgd_recipe": {
            **dp_sgd(4.0, augmult=4),
            "train": {"batch_size": 256, "steps": 300, "ema_decay": 0.99},
        },
        "dp_scatter_linear": {**dp_sgd(4.0), "model": {"name": "scatter_linear"}},
    }


def poisoning(kind: str = "backdoor", **sections) -> dict:
    """A poisoning setting: six hospitals, one malicious, and the given defence sections."""
    setting = {
        "trainer": "federated",
        "data": {"synthetic": {"num_sites": 6, "examples_per_site": 300}},
        "federated": {
            "algorithm": "fedavg",
            "rounds": 10,
            "local_steps": 10,
            "client_lr": 0.2,
            "eval_every": 1,
            "checkpoint_every": 10,
        },
        "poisoning": {"kind": kind, "fraction": 0.0 if kind == "none" else 1 / 6},
    }
    for name, fields in sections.items():
        setting[name] = {**setting.get(name, {}), **fields}
    return setting


def get_config(arg: str = ""):
    options = loading.parse_arg(
        arg, ("gpu", "tiny", "smoke", "recipe", "segmentation"), "configs/privacy_report.py"
    )
    if "segmentation" in options:
        options |= {"tiny"}
    config = base.get_base_config()
    config.seed = 0
    config.data.name = "synthetic"
    config.data.normalization = "fixed"  # the same pixels in every setting
    config.data.synthetic.num_sites = 4
    config.data.synthetic.examples_per_site = 1500
    config.data.synthetic.image_size = 16
    config.model.name = "small_cnn"

    # Centralized, non-private baseline (the task's own fields).
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.train.batch_size = 32
    config.train.steps = 1500
    config.train.eval_every = 1500
    config.train.checkpoint_every = 1500
    config.train.log_every = 50

    # Federated fields shared by the federated settings.
    config.federated.rounds = 30
    config.federated.local_steps = 10
    config.federated.client_batch_size = 32
    config.federated.client_lr = 0.05
    config.federated.eval_every = 30
    config.federated.checkpoint_every = 30

    fedavg = {"trainer": "federated", "federated": {"algorithm": "fedavg"}}
    config.report.settings = {
        "central": {"trainer": "central"},
        "fedavg": fedavg,
        "secagg": {
            "trainer": "federated",
            "federated": {"algorithm": "fedavg"},
            "secure_aggregation": {"method": "secagg"},
        },
        "dp_sgd_eps1": dp_sgd(1.0),
        "dp_sgd_eps4": dp_sgd(4.0),
        "dp_sgd_eps16": dp_sgd(16.0),
        # Patient-level DP-SGD: each patient's (at most 2) images clipped together.
        "dp_sgd_patient": {
            **dp_sgd(4.0, unit="patient", max_images_per_patient=2),
            "train": {"batch_size": 96, "steps": 300},
        },
        "dp_sgd_per_layer": dp_sgd(4.0, per_layer_clipping=True),
        **(recipe_settings() if "recipe" in options else {}),
        # Local DP-SGD inside every hospital (each site's own epsilon), then FedAvg.
        "local_dp_sgd": {
            "trainer": "federated",
            "federated": {"algorithm": "fedavg", "client_lr": 0.5},
            "privacy": {
                "enabled": True,
                "noise_multiplier": 1.0,
                "target_epsilon": 8.0,
                "delta": 1e-4,
                "clip_norm": 1.0,
            },
        },
        "dp_fedavg": {
            "trainer": "federated",
            "federated": {
                "algorithm": "dp_fedavg",
                "partition": {"method": "iid", "num_clients": 40},
                "clients_per_round": 10,
                "local_steps": 5,
                "client_batch_size": 16,
                "client_lr": 0.1,
            },
            "privacy": {"clip_norm": 0.5, "target_epsilon": 10.0, "delta": 1e-3},
        },
    }
    config.report.poisoning = {
        "no_attack": poisoning("none"),
        "backdoor_mean": poisoning(),
        "backdoor_median": poisoning(robust_aggregation={"method": "median"}),
        "backdoor_krum": poisoning(robust_aggregation={"method": "krum", "num_byzantine": 1}),
        "backdoor_norm_bound": poisoning(
            robust_aggregation={"method": "norm_bound", "norm_bound": 0.5}
        ),
        # Clipping to the same bound plus noise; with six clients any noise that yields a
        # meaningful epsilon drowns the model, so this is the clipping's effect at a weak claim.
        "backdoor_dp_fedavg": poisoning(
            federated={"algorithm": "dp_fedavg"},
            privacy={"clip_norm": 0.5, "noise_multiplier": 0.05, "delta": 1e-3},
        ),
    }
    config.report.shadow_models = 8
    config.report.shadow_steps = 300
    config.report.pool_size = 600
    config.report.inversion_batch_size = 1
    config.report.inversion_steps = 300
    config.report.inversion_restarts = 4
    config.report.audit_trials = 2000

    if "gpu" in options:
        config.data.synthetic.examples_per_site = 1200
        config.data.synthetic.image_size = 32
        config.train.steps = 3000
        config.train.eval_every = config.train.checkpoint_every = 1000
        config.federated.rounds = 100
        config.federated.eval_every = config.federated.checkpoint_every = 50
        for name in ("dp_sgd_eps1", "dp_sgd_eps4", "dp_sgd_eps16"):
            config.report.settings[name]["train"] = {"batch_size": 512, "steps": 1000}
        config.report.settings["dp_fedavg"]["federated"]["partition"]["num_clients"] = 200
        config.report.settings["dp_fedavg"]["federated"]["clients_per_round"] = 50
        config.report.shadow_models = 32
        config.report.shadow_steps = 1000
        config.report.pool_size = 2000
        config.report.inversion_batch_size = 4
        config.report.inversion_steps = 2000
        config.report.inversion_restarts = 8
        config.report.audit_trials = 20000
    if options & {"tiny", "smoke"}:
        config.report.fast_compile = True  # compiling is most of a seconds-long report
        config.data.synthetic.num_sites = 3
        config.data.synthetic.examples_per_site = 60
        config.data.synthetic.image_size = 16
        config.train.steps = 6
        config.train.eval_every = config.train.checkpoint_every = 6
        config.federated.rounds = 2
        config.federated.local_steps = 2
        config.federated.eval_every = config.federated.checkpoint_every = 2
        for name in (
            "dp_sgd_eps1",
            "dp_sgd_eps4",
            "dp_sgd_eps16",
            "dp_sgd_patient",
            "dp_sgd_per_layer",
            *(recipe_settings() if "recipe" in options else {}),
        ):
            config.report.settings[name]["train"] = {"batch_size": 16, "steps": 4}
        if "recipe" in options:
            config.report.settings["dp_sgd_recipe"]["train"]["ema_decay"] = 0.99
        del config.report.settings["dp_sgd_eps4"]
        del config.report.settings["dp_sgd_eps16"]
        config.report.broken_mechanisms = "no_noise"
        config.report.settings["dp_fedavg"]["federated"]["partition"]["num_clients"] = 12
        config.report.settings["dp_fedavg"]["federated"]["clients_per_round"] = 4
        config.report.settings["dp_fedavg"]["privacy"]["delta"] = 1e-2
        config.report.shadow_models = 2
        config.report.shadow_steps = 3
        config.report.pool_size = 20
        config.report.inversion_steps = 4
        config.report.inversion_restarts = 1
        config.report.audit_trials = 64
        # One cheap row: the backdoor against Krum, on a linear model.
        config.report.poisoning = {
            "backdoor_krum": poisoning(
                federated={"rounds": 2, "local_steps": 2, "checkpoint_every": 2},
                data={"synthetic": {"num_sites": 5, "examples_per_site": 60}},
                model={"name": "linear"},
                robust_aggregation={"method": "krum"},
            )
        }
    if "tiny" in options:
        # A first look in under a minute: pooled, federated and DP-SGD, without the broken
        # mechanisms' audits and the poisoning row (``:smoke`` runs every setting).
        for name in ("secagg", "dp_sgd_patient", "dp_sgd_per_layer", "local_dp_sgd", "dp_fedavg"):
            del config.report.settings[name]
        config.report.broken_mechanisms = ""
        config.report.poisoning = {}
    if "segmentation" in options:
        segmentation(config)
    return config


def segmentation(config) -> None:
    """``:segmentation``: the :tiny report on the lesion masks with a small U-Net."""
    config.data.task = "segmentation"
    config.model.name = "unet"
    config.model.kwargs.width = 4
    config.model.kwargs.depth = 1
    config.optimizer.learning_rate = 3e-3
    config.train.eval_batch_size = 64
    config.report.poisoning = {}
