"""One hospital of a deployed run: its own data, normalisation, local training and budget.

A site holds only its own images. It loads them from its ``--data`` (a MedMNIST ``.npz``, an
image folder, ``tfds:NAME``, or ``synthetic``: its own share of the config's synthetic study, for
trying a deployment on one machine), fits the normalisation statistics on its own training split
(:func:`fedjax_med.data.preprocess.fit_normalizer`; nothing about them leaves the site) and runs
the simulation's client code on them: the local update of
:func:`fedjax_med.trainers.federated.make_local_update` through the ``"loop"`` backend of
:mod:`fedjax_med.federated.for_each_client` (the jitted single-client function the simulation
runs on CPU), so a deployed delta is the simulated one.

Under local DP-SGD the site keeps its own ledger
(:class:`fedjax_med.trainers.ledgers.SiteLedgers` of one site) against its own target epsilon and
refuses a round its budget cannot afford, whatever the server asks: the guarantee is the site's
own, against a server it need not trust. In ``secure`` randomness mode (``privacy.noise_seed``)
the site draws its training and noise keys from the operating system and ignores the key the
server sends; in ``reproducible`` mode it uses the server's key, so the deployment replays the
simulation exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_med import randomness
from fedjax_med.config import loading, schema
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import partition, preprocess, sources
from fedjax_med.federated import client as client_lib
from fedjax_med.federated import for_each_client as fec
from fedjax_med.models import registry
from fedjax_med.secure import distributed_dp as distributed_dp_lib
from fedjax_med.trainers import federated, ledgers
from fedjax_med.training import evaluate

# Config sections server and sites must agree on (the data section names each site's own files).
SHARED_SECTIONS = ("seed", "model", "federated", "privacy", "secure_aggregation")


def config_digest(config: ml_collections.ConfigDict) -> str:
    """SHA-256 of the config sections every party must share (:data:`SHARED_SECTIONS`)."""
    data = loading.to_json_dict(config)
    shared = {k: data[k] for k in SHARED_SECTIONS if k in data}
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()


def _relabel(
    splits: dataset_lib.DatasetSplits, code: int | None = None
) -> dataset_lib.DatasetSplits:
    """The images of site ``code`` (``None``: all of them), relabelled as site 0."""

    def keep(d: dataset_lib.ImageDataset) -> dataset_lib.ImageDataset:
        if code is not None:
            d = d.take(np.flatnonzero(np.asarray(d.sites) == code))
        return dataclasses.replace(d, sites=np.zeros(len(d), np.int64))

    return dataclasses.replace(
        splits, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test)
    )


def _source_config(config: ml_collections.ConfigDict, data: str) -> ml_collections.ConfigDict:
    """``config.data`` pointed at the site's own ``data`` (a copy; the config is untouched)."""
    d = ml_collections.ConfigDict(config.data.to_dict())
    if data.startswith("tfds:"):
        d.name, d.tfds_name = "tfds", data.split(":", 1)[1]
    elif data.endswith(".npz"):
        d.name, d.path = "medmnist", data
    elif os.path.isdir(data):
        d.name, d.path = "image_folder", data
    else:
        raise ValueError(
            f"--data {data!r} must be 'synthetic', a MedMNIST .npz file, an image folder or "
            "tfds:NAME"
        )
    return d


def load_site_splits(
    config: ml_collections.ConfigDict, site: str, data: str
) -> dataset_lib.DatasetSplits:
    """The site's own splits (site code 0, ``info.site_names == (site,)``).

    ``data="synthetic"`` generates the config's synthetic study and keeps the images of the site
    named ``site``; any other source is entirely this site's.

    Raises:
      ValueError: for an unknown source, or a synthetic site name the study does not have.
    """
    if data == "synthetic":
        if config.data.name != "synthetic":
            raise ValueError(
                f"--data synthetic needs data.name='synthetic', not {config.data.name!r}"
            )
        splits = sources.load_splits(config.data, config.seed)
        names = splits.info.site_names
        if site not in names:
            raise ValueError(f"--site {site!r} must be one of the synthetic sites {list(names)}")
        splits = _relabel(splits, names.index(site))
    else:
        splits = _relabel(sources.load_splits(_source_config(config, data), config.seed))
    if len(splits.train) == 0:
        raise ValueError(f"site {site!r} has no training images in {data!r}")
    info = dataclasses.replace(splits.info, site_names=(site,))
    return dataclasses.replace(splits, info=info)


def site_target(config: ml_collections.ConfigDict, site: str, override: float) -> float:
    """The site's own target epsilon: ``override`` if > 0, else the config's for this site."""
    if override > 0:
        return float(override)
    text = ",".join(
        item
        for item in config.federated.site_target_epsilons.split(",")
        if item.partition("=")[0].strip() == site
    )
    return float(federated.parse_site_targets(text, (site,), config.privacy.target_epsilon)[0])


@functools.lru_cache(maxsize=8)
def _compiled(config_json: str, image_shape: tuple[int, ...], num_outputs: int, task: str):
    """The model, the loop-backend local update and the predict function of a config.

    Shared by the sites one process serves, so each program compiles once per process.
    """
    config = loading.from_json_dict(json.loads(config_json))
    model = registry.get_model(
        config.model.name,
        input_shape=image_shape,
        num_outputs=num_outputs,
        **config.model.kwargs.to_dict(),
    )
    f = config.federated
    local = federated.make_local_update(config, model, task, f.local_steps)
    runner = fec.for_each_client(local, backend="loop")
    return model, runner, evaluate.make_predict_fn(model.apply, task)


class Site:
    """A hospital's side of the deployment (see the module docstring).

    Args:
      config: the study's config (the same file the server runs).
      site: this hospital's name, as on the server's site list.
      data: where its images are (see :func:`load_site_splits`).
      target_epsilon: this site's own budget under local DP-SGD (0: the config's).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        site: str,
        data: str,
        target_epsilon: float = 0.0,
    ):
        self.config = config
        self.name = site
        self.splits = load_site_splits(config, site, data)
        info = self.splits.info
        self.normalizer = preprocess.fit_normalizer(
            self.splits.train,
            1,
            method=config.data.normalization,
            mean=config.data.mean,
            std=config.data.std,
        )
        self.model, self.runner, self.predict_fn = _compiled(
            json.dumps(loading.to_json_dict(config), sort_keys=True),
            tuple(info.image_shape),
            info.num_outputs,
            info.task,
        )
        self.private = schema.mechanism(config) == "local_dp_sgd"
        self.randomness = randomness.Randomness(config.privacy.noise_seed, config.seed)
        self.target_epsilon = site_target(config, site, target_epsilon)
        self._data: dict[int, client_lib.ClientData] = {}

    @functools.cached_property
    def template(self) -> Any:
        """The model's parameter shapes and dtypes, traced once (what received trees must match)."""
        return template(self.model, self.config.seed)

    # ---- what the server may know ----------------------------------------------------------
    def client_data(self, padded_size: int) -> client_lib.ClientData:
        """The site's training images as one client padded to ``padded_size`` rows."""
        if padded_size not in self._data:
            train = self.splits.train
            fed = partition.make_federated(
                train, [np.arange(len(train))], [self.name], pad_to=padded_size
            )
            self._data[padded_size] = client_lib.from_federated_dataset(fed, self.normalizer)
        return self._data[padded_size]

    def metadata(self) -> dict[str, Any]:
        """Public facts about the site: its size, patients, image shape, task, config digest."""
        info = self.splits.info
        data = self.client_data(len(self.splits.train))
        return {
            "site": self.name,
            "num_examples": len(self.splits.train),
            "num_units": int(client_lib.num_units(data)[0]),
            "image_shape": list(info.image_shape),
            "task": info.task,
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            "config_digest": config_digest(self.config),
            "target_epsilon": self.target_epsilon,
        }

    def ledger(self, steps: int = 0) -> ledgers.SiteLedgers:
        """The site's own local DP-SGD ledger after ``steps`` local steps."""
        p, f = self.config.privacy, self.config.federated
        data = self.client_data(len(self.splits.train))
        units = client_lib.num_units(data) if p.unit == "patient" else data.counts
        return ledgers.SiteLedgers(
            names=(self.name,),
            num_units=np.asarray(units, np.int64),
            unit=p.unit,
            targets=np.array([self.target_epsilon]),
            noise_multiplier=float(p.noise_multiplier),
            batch_size=f.client_batch_size,
            local_steps=f.local_steps,
            delta=p.delta,
            accountant=p.accountant,
            steps=np.array([steps], np.int64),
        )

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a Site lives as long as its process
    def distributed_dp(self, num_clients: int) -> distributed_dp_lib.DistributedDP | None:
        """The site's distributed DP for a protocol of ``num_clients`` (0 or unconfigured: None).

        Built from the site's own config exactly as the simulation builds it (kind, clip,
        noise multiplier, delta, threshold of the configured protocol), so the noise it adds is
        its own choice; only the number of clients the noise is shared among comes from the
        server. Its noise comes from the site's randomness (``secure``: the OS, fresh each time).
        """
        if num_clients <= 0 or self.config.secure_aggregation.distributed_dp == "none":
            return None
        cohort = types.SimpleNamespace(cohort_size=num_clients)
        return federated._distributed_dp(self.config, self.model, cohort, self.randomness)

    # ---- one round -------------------------------------------------------------------------
    def train(
        self,
        params: Any,
        padded_size: int,
        key: jax.Array,
        server_control: Any = None,
        client_control: Any = None,
    ) -> client_lib.ClientOutput:
        """The local update from ``params``: the simulation's client function on this site.

        ``key`` is the server's key for this client and round; a ``secure`` run replaces it with
        a fresh key from the operating system. Returns one client's output (no leading axis).
        """
        if padded_size < len(self.splits.train):
            raise ValueError(
                f"padded_size={padded_size} must be >= the site's {len(self.splits.train)} images"
            )
        if self.randomness.secure:
            key = randomness.secure_key()
        d = self.client_data(padded_size)
        scaffold = self.runner.local_update.scaffold
        out = self.runner(
            params,
            d.images,
            d.labels,
            d.mask,
            d.counts,
            key[None],
            server_control if scaffold else None,
            jax.tree.map(lambda c: c[None], client_control) if scaffold else None,
            unit_ids=d.unit_ids,
        )
        return jax.tree.map(lambda x: x[0], out)

    def evaluate(self, params: Any, split: str) -> dict[str, float]:
        """``{split}_*`` metrics of ``params`` on the site's own ``split`` and its size."""
        data = self.splits.split(split)
        if len(data) == 0:
            return {f"{split}_num_examples": 0.0}
        result = evaluate.evaluate(
            self.predict_fn,
            params,
            data,
            self.splits.info,
            self.normalizer,
            self.config.train.eval_batch_size,
        )
        values = evaluate.prefixed(result["metrics"], split)
        values[f"{split}_num_examples"] = float(len(data))
        return {k: float(v) for k, v in values.items() if isinstance(v, int | float | np.number)}


def template(model: registry.Model, seed: int) -> Any:
    """The model's parameter shapes and dtypes (what a received tree must match)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed)))


def zeros_like_shapes(shapes: Any) -> Any:
    """Zeros of a tree of ``ShapeDtypeStruct``."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
