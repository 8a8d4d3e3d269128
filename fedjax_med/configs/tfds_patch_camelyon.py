"""PatchCamelyon (Veeling et al., MICCAI 2018) histology patches from tensorflow-datasets.

    fedjax-med train --config tfds_patch_camelyon \
        --config.data.data_dir=~/tensorflow_datasets --workdir runs/pcam

Reads the prepared dataset with random access (``tfds.data_source``); prepare it once with
tensorflow-datasets where a network is available. Patches are resized to 32x32 for speed; set
``--config.data.image_size=96`` for full resolution.
"""

from fedjax_med.config import base


def get_config(arg: str = ""):
    config = base.get_base_config()
    config.data.name = "tfds"
    config.data.tfds_name = arg or "patch_camelyon"
    config.data.image_size = 32
    config.data.normalization = "fixed"
    config.model.name = "resnet_gn"
    config.train.batch_size = 64
    config.train.steps = 5000
    return config
