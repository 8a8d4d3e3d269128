"""The base experiment config: every field a run can set, with its default.

Config files under ``configs/`` start from :func:`get_base_config` and change a few fields, so a
field is defined exactly once. :mod:`fedjax_med.config.schema` validates a config against this
base (unknown keys, types, ranges) before anything is compiled.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    """Returns the default config (centralized, non-private, small CNN on synthetic sites)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.trainer = "central"  # central | federated

    # ---- data ------------------------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"  # synthetic | medmnist | tfds | image_folder | volume_folder
    config.data.path = ""  # medmnist: the .npz file; image_folder, volume_folder: the root folder
    config.data.tfds_name = ""  # tfds: dataset name, e.g. "patch_camelyon"
    config.data.data_dir = ""  # tfds: where prepared datasets live ("" = tfds default)
    config.data.cache_dir = ""  # synthetic: cache folder ("" = ~/.cache/fedjax_med, "none" = off)
    config.data.image_size = 0  # resize to this side length (0 = keep the source's size)
    config.data.channels = 0  # 1 grayscale, 3 RGB (0 = keep the source's; image_folder: 1)
    # "" = infer; or multiclass | binary | multilabel | segmentation (labels are per-pixel masks:
    # the synthetic lesions' masks, root/<site>/{images,masks}/ folders, .npz with *_masks)
    config.data.task = ""
    # The number of classes, declared (0 = infer: class folders, tfds ClassLabel, synthetic
    # num_classes, or a MedMNIST file's largest label + 1). A label outside it is refused, as is
    # a source with a different number of classes.
    config.data.num_classes = 0
    # MedMNIST only: accept inferred class ids with gaps (e.g. 0, 2, 7). Off, a gap is refused,
    # since one stray label would silently make a much larger task.
    config.data.sparse_labels = False
    config.data.max_examples = 0  # cap per split, for quick runs (0 = all); every source
    config.data.val_fraction = 0.1  # for sources without predefined splits
    config.data.test_fraction = 0.2
    # Normalisation never pools raw statistics across sites: either fixed constants or each
    # site's own training statistics.
    config.data.normalization = "per_site"  # per_site | fixed
    config.data.mean = 0.5  # fixed normalisation, on images scaled to [0, 1]
    config.data.std = 0.25
    # DICOM (image_folder, volume_folder) and NIfTI display window after the rescale to
    # Hounsfield units: header (the file's window; else its full range) | none (raw rescaled
    # values) | "CENTRE,WIDTH", e.g. "40,400" soft tissue, "-600,1500" lung.
    config.data.window = "header"

    config.data.synthetic = ml_collections.ConfigDict()
    config.data.synthetic.num_sites = 6
    config.data.synthetic.examples_per_site = 1200
    config.data.synthetic.image_size = 32
    config.data.synthetic.num_classes = 4
    config.data.synthetic.images_per_patient = 3
    config.data.synthetic.site_heterogeneity = 1.0
    config.data.synthetic.depth = 0  # 0: 2-D images; D >= 8: 3-D volumes D x S x S

    # ---- model -----------------------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.name = "small_cnn"
    config.model.kwargs = ml_collections.ConfigDict()  # passed to the model factory
    # Start from pretrained parameters (private fine-tuning, Berrada et al. 2023): a flax msgpack
    # file of the params tree, or a central workdir (its latest checkpoint). Leaves whose path and
    # shape match are copied; the others (e.g. a head for another class count) start fresh.
    config.model.init_from = ""

    # ---- optimizer -------------------------------------------------------------------------
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"  # sgd | momentum | adam | adamw
    config.optimizer.learning_rate = 1e-3
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = "constant"  # constant | cosine
    config.optimizer.warmup_steps = 0

    # ---- differential privacy (DP-SGD, Abadi et al. 2016) ------------------------------------
    config.privacy = ml_collections.ConfigDict()
    # What runs: auto (from the fields below) | none | dp_sgd (central trainer, privacy.enabled) |
    # local_dp_sgd (federated, privacy.enabled) | dp_fedavg (federated.algorithm) |
    # distributed_dp (secure_aggregation.distributed_dp). An explicit value must agree with those
    # fields.
    config.privacy.mechanism = "auto"
    config.privacy.enabled = False
    config.privacy.unit = "example"  # example | patient: what one neighbouring dataset differs by
    config.privacy.max_images_per_patient = 2  # patient unit: at most k images per step
    config.privacy.clip_norm = 1.0  # C: per-example (per-patient) L2 clipping norm
    config.privacy.noise_multiplier = 0.0  # sigma; 0 = calibrate it from target_epsilon
    config.privacy.target_epsilon = 0.0  # the budget; 0 = the epsilon the planned steps spend
    config.privacy.delta = 1e-5
    config.privacy.accountant = "rdp"  # rdp | pld (both from dp_accounting)
    # poisson (each unit independently with q = batch_size / N, what the accountant assumes) or
    # shuffle (fixed-size batches, accounted as sampling without replacement, replace-one).
    config.privacy.sampling = "poisson"
    config.privacy.overflow_prob = 1e-3  # P(a Poisson batch needs a second padded chunk)
    config.privacy.per_layer_clipping = False
    config.privacy.method = "ghost"  # ghost (norm trick) | vmap (reference per-example grads)
    # The physical batch: per-example work in chunks of this many, accumulated and noised once per
    # logical batch (train.batch_size, e.g. thousands), so it bounds memory only (0 = off).
    config.privacy.microbatch_size = 0
    config.privacy.noise_seed = "reproducible"  # reproducible (from seed) | secure (OS entropy)
    # Augmentation multiplicity (De et al. 2022): each unit's gradient is the mean over this many
    # augmented views of each of its images, clipped once, so epsilon is unchanged (0 = off).
    config.privacy.augmult = 0
    # The views' operations, comma-separated: flip (horizontal) | vflip | shift (reflect-pad and
    # crop back, at most privacy.augment_shift pixels each way). Only read when augmult > 0.
    config.privacy.augmentations = "flip,shift"
    config.privacy.augment_shift = 4

    # ---- federated simulation (config.trainer = "federated") ---------------------------------
    config.federated = ml_collections.ConfigDict()
    # fedavg | fedavgm | fedprox | fedadam | fedyogi | fedadagrad | scaffold | dp_fedavg |
    # fedbn (Li et al. 2021: each site keeps its own normalisation scales and biases) | ditto
    # (Li et al. 2021: each site also trains a personal model near the global one)
    config.federated.algorithm = "fedavg"
    # How the training split becomes clients (a patient's images stay on one client).
    config.federated.partition = ml_collections.ConfigDict()
    config.federated.partition.method = "by_site"  # by_site | iid | dirichlet | quantity_skew
    config.federated.partition.num_clients = 0  # 0 = one client per site
    config.federated.partition.alpha = 0.5  # Dirichlet label-skew concentration
    config.federated.partition.beta = 0.5  # quantity-skew concentration
    config.federated.rounds = 50
    config.federated.clients_per_round = 0  # 0 = every client; the expected cohort for dp_fedavg
    config.federated.local_steps = 5  # minibatch SGD steps per client per round
    config.federated.client_batch_size = 32
    config.federated.client_lr = 0.05
    # The clients' local optimizer, restarted every round: sgd (plain SGD, as in McMahan et al.
    # 2017) | adam (Kingma & Ba 2015; local adaptivity, e.g. for Dice losses that plain SGD leaves
    # in the all-background solution). scaffold needs sgd.
    config.federated.client_optimizer = "sgd"
    # 0 = the algorithm's default (trainers/federated.py: DEFAULT_SERVER_LR): 1.0 for fedavg,
    # fedprox, scaffold, fedavgm and dp_fedavg; 0.01 for fedadam and fedyogi; 0.1 for fedadagrad.
    config.federated.server_lr = 0.0
    config.federated.server_momentum = 0.9  # fedavgm
    config.federated.server_tau = 1e-3  # fedadam / fedyogi / fedadagrad adaptivity
    config.federated.prox_mu = 0.01  # fedprox
    # ditto: lambda of the personal objective f_k(v) + (lambda / 2) ||v - w||^2, in
    # [0, 2 / client_lr) (0 = purely local personal models; larger = closer to the global one)
    config.federated.ditto_lambda = 0.1
    config.federated.dropout_prob = 0.0  # a sampled client fails to report with this probability
    config.federated.max_update_norm = 0.0  # exclude larger updates (0 = only non-finite ones)
    config.federated.backend = "auto"  # auto | vmap | sharded | loop
    config.federated.chunk_size = 0  # clients vmapped together (0 = the whole cohort)
    config.federated.eval_every = 10
    config.federated.checkpoint_every = 10
    # dp_fedavg (McMahan et al. 2018) reads privacy.clip_norm (S), privacy.noise_multiplier (z)
    # or privacy.target_epsilon, privacy.delta, privacy.accountant and privacy.noise_seed.
    config.federated.adaptive_clipping = False  # Andrew et al. 2021 quantile-based S
    config.federated.target_quantile = 0.5
    # privacy.enabled with a non-DP algorithm = local DP-SGD inside every site: each step clips
    # per-example gradients to privacy.clip_norm and adds noise privacy.noise_multiplier; each
    # site's epsilon is accounted separately, and a site stops contributing once the next round
    # would pass its budget: privacy.target_epsilon, or a per-site value from
    # site_target_epsilons ("hospital_0=2.0,hospital_3=4.0").
    config.federated.site_target_epsilons = ""
    # Personalisation: after training, each site fine-tunes the global model for this many local
    # steps on its own training images and is evaluated on its own test images (0 = off;
    # needs federated.partition.method = "by_site").
    config.federated.personalization_steps = 0

    # ---- secure aggregation of federated rounds (config.trainer = "federated") -------------------
    config.secure_aggregation = ml_collections.ConfigDict()
    # none | secagg (Bonawitz et al. 2017) | secagg_plus (Bell et al. 2020) | additive (shares
    # among non-colluding servers). Deltas are clipped per coordinate to clip before fixed-point
    # encoding. SecAgg+'s neighbours k and Shamir threshold t follow Bell et al. from the number of
    # clients, the fraction that may drop out (dropout_rate) and the fraction assumed to collude
    # with the server (corrupted_fraction). he_ckks (CKKS homomorphic encryption, needs
    # pip install 'fedjax_med[he]'): the server adds ciphertexts, a separate key holder (not
    # colluding with it) decrypts only the sum; see fedjax_med/secure/he_ckks.py.
    config.secure_aggregation.method = "none"
    config.secure_aggregation.clip = 0.5
    config.secure_aggregation.dropout_rate = 0.05
    config.secure_aggregation.corrupted_fraction = 0.0
    # he_ckks: CKKS ring degree N (4096 | 8192 | 16384; N / 2 coordinates per ciphertext).
    config.secure_aggregation.he_poly_modulus_degree = 4096
    # Distributed DP with secagg / secagg_plus: clients clip to privacy.clip_norm and add integer
    # noise (none | discrete_gaussian | skellam) so the secure sum carries privacy.noise_multiplier.
    config.secure_aggregation.distributed_dp = "none"

    # ---- robust aggregation of federated rounds (config.trainer = "federated") --------------
    config.robust_aggregation = ml_collections.ConfigDict()
    # The FedAvg family's server rule: mean | median | trimmed_mean (Yin et al. 2018) | krum |
    # multi_krum (Blanchard et al. 2017) | bulyan (El Mhamdi et al. 2018) | norm_bound (clip every
    # update, then the mean; Sun et al. 2019). The robust rules need every individual update, so
    # none runs with secure aggregation; DP-FedAvg and SCAFFOLD keep their own sums.
    config.robust_aggregation.method = "mean"
    # f: the arbitrary clients a rule is built to tolerate (trimmed_mean drops f per side); the
    # cohort must exceed the rule's breakdown point (krum: n > 2f + 2, bulyan: n >= 4f + 3).
    config.robust_aggregation.num_byzantine = 1
    config.robust_aggregation.num_selected = 0  # multi_krum's m (0 = n - f)
    config.robust_aggregation.norm_bound = 1.0  # norm_bound: the L2 bound M of every update
    config.robust_aggregation.noise_std = 0.0  # norm_bound: weak-DP noise per coordinate (0: off)

    # ---- poisoning: malicious clients of the simulated federation ----------------------------
    config.poisoning = ml_collections.ConfigDict()
    # none | label_flip (their labels y -> K-1-y) | backdoor (Bagdasaryan et al. 2020: trigger
    # + target label on poison_fraction of their images, update boosted for model replacement)
    # | scale | sign_flip (their update times boost / -boost) | little_is_enough (Baruch et al.
    # 2019: mean - z std of the honest updates, per coordinate).
    config.poisoning.kind = "none"
    config.poisoning.fraction = 0.0  # of the clients, malicious for the whole run (at least 1)
    # gamma; 0 = the kind's default: n / server_lr (n clients per round: model replacement) for
    # backdoor and scale, 1 for sign_flip.
    config.poisoning.boost = 0.0
    config.poisoning.z = 0.0  # little_is_enough; 0 = Baruch et al.'s z_max from n and m
    config.poisoning.target_label = 0  # backdoor: the class triggered images should read as
    config.poisoning.trigger_size = 3  # backdoor: side of the checkerboard in the corner (pixels)
    config.poisoning.poison_fraction = 0.5  # backdoor: of each malicious client's images

    # ---- training loop ---------------------------------------------------------------------
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64
    config.train.steps = 1000
    config.train.eval_every = 250
    config.train.eval_batch_size = 256
    config.train.checkpoint_every = 500
    config.train.log_every = 50
    # What trains: all | head (the last layer) | head+norm (and every normalisation layer); the
    # rest stays bit-identical, and DP-SGD clips and noises only the trained parameters.
    config.train.trainable = "all"
    # Parameter averaging, evaluated beside the raw parameters (report.json test_<metric>_ema,
    # test_<metric>_polyak); post-processing of the released iterates, so free under DP.
    config.train.ema_decay = 0.0  # d in [0, 1), warmed up as min(d, (1+t)/(10+t)); 0 = off
    config.train.polyak_start = -1  # average the iterates after this step (-1 = off)
    # Data parallelism over a 1-D mesh of this many devices (0 = all devices JAX sees, across
    # hosts after jax.distributed.initialize()); batch sizes must be divisible by it.
    config.train.num_devices = 0

    # ---- privacy report (fedjax-med report; ignored by train) ------------------------------
    config.report = ml_collections.ConfigDict()
    # Free-form: setting name -> nested overrides of this config (e.g. {"trainer": "federated",
    # "secure_aggregation": {"method": "secagg"}}); each setting is trained and attacked.
    config.report.settings = ml_collections.ConfigDict()
    # Free-form like settings: poisoning setting name -> overrides of a federated run with
    # malicious clients (poisoning.*) and a defence (robust_aggregation.*, dp_fedavg); each is
    # trained and its clean accuracy and attack success tabulated (no privacy attacks).
    config.report.poisoning = ml_collections.ConfigDict()
    config.report.shadow_models = 8  # LiRA shadow models trained together under vmap (0: none)
    config.report.shadow_steps = 300  # full-batch SGD steps of each shadow model
    config.report.shadow_lr = 0.05
    config.report.shadow_batch_size = 32  # examples per shadow step (0: full batch)
    config.report.pool_size = 600  # examples LiRA scores: half training, half test split
    config.report.inversion_batch_size = 1  # images behind each attacked update
    config.report.inversion_local_steps = 1  # 1: FedSGD gradient; more: a FedAvg update
    config.report.inversion_steps = 300
    config.report.inversion_restarts = 4
    # The round whose update is inverted: "first" (the initial model, where updates leak most)
    # or "last" (the trained model).
    config.report.inversion_round = "first"
    config.report.audit_trials = 2000  # canary releases per audit, half with the canary
    config.report.audit_confidence = 0.95
    # Deliberately broken variants of the DP-SGD code audited beside the real one.
    config.report.broken_mechanisms = "no_noise,wrong_scale"
    # Compile without XLA's optimisation passes: for seconds-long smoke reports, where compiling
    # is most of the time (same results up to floating-point reassociation).
    config.report.fast_compile = False
    # Processes that train the settings' runs ahead while this one attacks the trained ones
    # (XLA compiles on one thread, so this keeps a small CPU busy); 0: train here, one by one.
    config.report.workers = 2
    return config
