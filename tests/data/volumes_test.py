"""Volumes through the data layer: MedMNIST-3D files, NIfTI folders, the synthetic 3-D variant."""

import hashlib

import numpy as np
import pytest

from fedjax_med.config import base, schema
from fedjax_med.data import medmnist, preprocess, sources, synthetic, volumes


def write_medmnist3d(path, sizes=(("train", 12), ("val", 4), ("test", 6)), side=28, classes=3):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, side, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes)[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return str(path)


def test_medmnist3d_file_reads_as_volumes(tmp_path):
    path = write_medmnist3d(tmp_path / "organmnist3d.npz")
    splits = medmnist.load_medmnist(path)
    assert splits.info.image_shape == (28, 28, 28, 1)
    assert splits.train.images.shape == (12, 28, 28, 28, 1)
    assert splits.info.task == "multiclass" and splits.info.num_classes == 3
    with np.load(path) as raw:  # the voxels are the file's, in its order
        np.testing.assert_array_equal(splits.test.images[..., 0], raw["test_images"])


def test_image_size_resamples_volumes_and_channels_three_is_refused(tmp_path):
    config = base.get_base_config()
    config.data.name, config.data.path = "medmnist", write_medmnist3d(tmp_path / "v.npz")
    config.data.image_size = 16
    splits = sources.load_splits(config.data, 0)
    assert splits.info.image_shape == (16, 16, 16, 1) and splits.train.images.dtype == np.uint8
    config.data.channels = 3
    with pytest.raises(ValueError, match="data.channels'=3 must be 0 or 1 for volumes"):
        sources.load_splits(config.data, 0)


def test_resize_volume_keeps_a_linear_ramp_linear():
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 4, 4))
    out = volumes.resize_volume(ramp, 4)
    assert out.shape == (4, 4, 4)
    steps = np.diff(out[:, 0, 0])
    np.testing.assert_allclose(steps, steps[0], atol=1e-4)  # evenly spaced, increasing
    assert steps[0] > 0 and np.allclose(out[:, 0, 0], out[:, 3, 2])


def test_per_site_normalisation_of_volumes_standardises_each_site():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 4, 4, 4, 1), dtype=np.uint8)
    images[3:] //= 4  # a darker second site
    sites = np.array([0, 0, 0, 1, 1, 1])
    data = synthetic.dataset.ImageDataset(images, np.zeros(6, np.int32), sites, np.arange(6))
    norm = preprocess.fit_normalizer(data, 2, method="per_site")
    x = norm(images, sites)
    assert x.shape == images.shape
    for site in (0, 1):
        assert abs(x[sites == site].mean()) < 1e-5 and abs(x[sites == site].std() - 1) < 1e-3


@pytest.fixture(scope="module")
def nifti_root(tmp_path_factory):
    nibabel = pytest.importorskip("nibabel")
    root = tmp_path_factory.mktemp("nifti")
    rng = np.random.default_rng(2)
    for site in ("a", "b"):
        for cls in ("healthy", "tumour"):
            (root / site / cls).mkdir(parents=True)
            for i in range(4):
                data = rng.normal(0, 10, (6, 5, 4)) + 300 * (cls == "tumour")  # (x, y, z)
                image = nibabel.Nifti1Image(data.astype(np.float32), np.eye(4))
                image.header["cal_min"], image.header["cal_max"] = -50, 350
                nibabel.save(image, str(root / site / cls / f"{i}.nii.gz"))
    return root


def test_nifti_folder_reads_volumes_in_slice_major_order(nifti_root):
    splits = volumes.load_volume_folder(
        str(nifti_root), window="none", val_fraction=0.25, test_fraction=0.25
    )
    # (x, y, z) = (6, 5, 4) on disk -> (D, H, W) = (z, y, x).
    assert splits.info.image_shape == (4, 5, 6, 1) and splits.info.num_classes == 2
    data = splits.train
    means = [data.images[data.labels == k].mean() for k in (0, 1)]
    assert means[0] < 50 < 250 < means[1]  # raw values with window "none"
    windowed = volumes.load_volume_folder(
        str(nifti_root), image_size=3, val_fraction=0.25, test_fraction=0.25
    )  # header cal_min / cal_max
    assert windowed.info.image_shape == (3, 3, 3, 1)
    assert 0 <= windowed.train.images.min() and windowed.train.images.max() <= 1


def test_volume_folder_through_the_config(nifti_root):
    config = base.get_base_config()
    config.data.name, config.data.path, config.data.window = (
        "volume_folder",
        str(nifti_root),
        "0,100",
    )
    config.data.val_fraction = config.data.test_fraction = 0.25
    schema.validate(config)
    splits = sources.load_splits(config.data, 0)
    assert len(splits.info.site_names) == 2
    tumour = splits.train.images[splits.train.labels == 1]
    assert tumour.min() == 1.0  # 300 lies above the window [-0.5 + 0, 99.5]
    config.data.window = "soft"
    with pytest.raises(schema.ConfigError, match="data.window"):
        schema.validate(config)


def test_volume_folder_without_nibabel_names_the_extra(nifti_root, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "nibabel", None)
    with pytest.raises(ImportError, match=r"fedjax_med\[nifti\]"):
        volumes.load_volume_folder(str(nifti_root))


SPEC3 = synthetic.SyntheticSpec(num_sites=2, examples_per_site=30, image_size=16, depth=8)


def test_synthetic_volumes_are_seeded_and_shaped():
    a, b = synthetic.generate(SPEC3), synthetic.generate(SPEC3)
    assert a.info.image_shape == (8, 16, 16, 1) and a.train.images.dtype == np.uint8
    np.testing.assert_array_equal(a.train.images, b.train.images)
    other = synthetic.generate(synthetic.SyntheticSpec(**{**SPEC3.__dict__, "seed": 1}))
    assert not np.array_equal(a.train.images[:4], other.train.images[:4])
    # Patients and classes are the 2-D benchmark's: only the rendering differs.
    flat = synthetic.generate(synthetic.SyntheticSpec(**{**SPEC3.__dict__, "depth": 0}))
    np.testing.assert_array_equal(np.sort(a.train.patient_ids), np.sort(flat.train.patient_ids))


def _digest(spec):
    arrays = synthetic._to_arrays(synthetic.generate(spec))
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def test_two_d_bytes_and_cache_key_are_unchanged_by_the_volume_variant():
    # Digests and cache name of the generator before volumes existed (GENERATOR_VERSION 1).
    spec = synthetic.SyntheticSpec(num_sites=2, examples_per_site=40, image_size=16, seed=3)
    assert _digest(spec) == "b1271b2b2f3763940dad880e73475b2898ad637154beeb45a314aca07a391dbc"
    assert synthetic.cache_path(spec, "c").endswith("synthetic_8c1323624b21ee486709.npz")
    assert synthetic.cache_path(SPEC3, "c") != synthetic.cache_path(
        synthetic.SyntheticSpec(**{**SPEC3.__dict__, "depth": 0}), "c"
    )


def test_synthetic_depth_field_is_checked():
    with pytest.raises(ValueError, match=r"depth=4 must be 0 \(images\) or in \[8, 256\]"):
        synthetic.validate_spec(synthetic.SyntheticSpec(depth=4))
    config = base.get_base_config()
    config.data.synthetic.depth = 4
    with pytest.raises(schema.ConfigError, match="data.synthetic.depth"):
        schema.validate(config)
