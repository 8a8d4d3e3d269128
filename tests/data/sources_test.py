"""``sources.load_splits``: every data field acts on every source, or is refused."""

import numpy as np
import pytest

from fedjax_med.config import base, schema
from fedjax_med.data import medmnist, sources

SIZES = {"train": 12, "val": 4, "test": 6}


def _tiny_synthetic(**data_fields):
    config = base.get_base_config()
    s = config.data.synthetic
    s.num_sites, s.examples_per_site, s.image_size = 3, 30, 16
    config.data.cache_dir = "none"
    for key, value in data_fields.items():
        config.data[key] = value
    return config


def _npz(tmp_path, stray=None, num_labels=4):
    arrays = {}
    for split, n in SIZES.items():
        arrays[f"{split}_images"] = np.zeros((n, 8, 8), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % num_labels)[:, None].astype(np.uint8)
    if stray is not None:
        arrays["train_labels"][5] = stray
    path = tmp_path / "four.npz"
    np.savez(path, **arrays)
    return str(path)


# ---- labels against the declared or inferred number of classes ---------------------------------
def test_stray_label_is_refused_naming_value_and_count(tmp_path):
    path = _npz(tmp_path, stray=99)
    with pytest.raises(ValueError, match=r"value 99 on 1 example \(train_labels 1\)") as e:
        medmnist.load_medmnist(path)
    assert "ids 4..98 with no example" in str(e.value)
    assert "data.num_classes" in str(e.value) and "data.sparse_labels" in str(e.value)


def test_declared_num_classes_refuses_labels_outside_it(tmp_path):
    path = _npz(tmp_path, stray=99)
    with pytest.raises(ValueError, match=r"\[0, 4\) \(data.num_classes=4\); found value 99 on 1"):
        medmnist.load_medmnist(path, num_classes=4)
    assert medmnist.load_medmnist(_npz(tmp_path), num_classes=4).info.num_classes == 4


def test_declared_num_classes_may_exceed_the_labels_seen(tmp_path):
    splits = medmnist.load_medmnist(_npz(tmp_path, num_labels=3), num_classes=5)
    assert splits.info.num_classes == 5 and splits.info.task == "multiclass"


def test_sparse_labels_accepts_gaps(tmp_path):
    splits = medmnist.load_medmnist(_npz(tmp_path, stray=99), sparse_labels=True)
    assert splits.info.num_classes == 100


def test_sparse_labels_only_for_medmnist():
    config = _tiny_synthetic(sparse_labels=True)
    with pytest.raises(schema.ConfigError, match=r"'data.sparse_labels' applies only to"):
        schema.validate(config)


def test_config_path_reaches_the_loader(tmp_path):
    config = base.get_base_config()
    config.data.name, config.data.path, config.data.num_classes = "medmnist", _npz(tmp_path), 3
    with pytest.raises(ValueError, match=r"found value 3 on"):
        sources.load_splits(config.data, 0)


def test_synthetic_num_classes_must_agree():
    config = _tiny_synthetic(num_classes=3)
    with pytest.raises(schema.ConfigError, match=r"'data.num_classes'=3 must be 0 or data.synth"):
        schema.validate(config)


# ---- data fields on the synthetic source --------------------------------------------------------
def test_synthetic_max_examples_caps_every_split_keeping_every_site():
    full = sources.load_splits(_tiny_synthetic().data, 0)
    capped = sources.load_splits(_tiny_synthetic(max_examples=9).data, 0)
    for name in ("train", "val", "test"):
        assert len(capped.split(name)) == min(9, len(full.split(name)))
    assert set(np.unique(capped.train.sites)) == set(np.unique(full.train.sites))


def test_synthetic_channels_converts():
    rgb = sources.load_splits(_tiny_synthetic(channels=3).data, 0)
    gray = sources.load_splits(_tiny_synthetic().data, 0)
    assert rgb.info.image_shape == (16, 16, 3) and rgb.train.images.shape[-1] == 3
    np.testing.assert_array_equal(rgb.train.images[..., 0], gray.train.images[..., 0])
    np.testing.assert_array_equal(rgb.train.images[..., 2], gray.train.images[..., 0])


def test_medmnist_channels_and_image_size_act(tmp_path):
    config = base.get_base_config()
    config.data.name, config.data.path = "medmnist", _npz(tmp_path)
    config.data.channels, config.data.image_size = 3, 16
    splits = sources.load_splits(config.data, 0)
    assert splits.info.image_shape == (16, 16, 3) == splits.test.images.shape[1:]


def test_task_that_does_not_fit_is_refused():
    with pytest.raises(schema.ConfigError, match=r"'data.task'='multilabel' does not fit"):
        schema.validate(_tiny_synthetic(task="multilabel"))


# ---- partition fields ---------------------------------------------------------------------------
def test_by_site_with_another_num_clients_is_refused():
    config = _tiny_synthetic()
    config.trainer = "federated"
    config.federated.partition.num_clients = 10
    with pytest.raises(
        schema.ConfigError,
        match=r"'federated.partition.num_clients'=10 must be 0 or data.synthetic.num_sites=3",
    ):
        schema.validate(config)
    config.federated.partition.num_clients = 3
    schema.validate(config)


def test_by_site_num_clients_checked_against_loaded_sites(tmp_path):
    from fedjax_med.trainers import federated

    config = base.get_base_config()
    config.trainer = "federated"
    config.data.name, config.data.path = "medmnist", _npz(tmp_path)
    config.federated.partition.num_clients = 2
    splits = sources.load_splits(config.data, 0)
    with pytest.raises(ValueError, match=r"num_clients'=2 must be 0 or the number of sites \(1\)"):
        federated.build_federation(config, splits)
