"""Train on a multi-hospital image folder: ``root/<site>/<class>/*.png``.

    fedjax-med train --config image_folder --config.data.path=/data/study \
        --workdir runs/study

Each site folder is a hospital. An optional ``root/metadata.csv`` (``path,patient_id,...``) groups
images by patient (splits never separate a patient's images) and adds subgroup columns (e.g.
``sex``, ``age_band``) that get their own metrics in the report.
"""

from fedjax_med.config import base


def get_config(arg: str = ""):
    config = base.get_base_config()
    config.data.name = "image_folder"
    config.data.path = arg or "data/image_folder"
    config.data.image_size = 64
    config.data.channels = 1
    config.model.name = "resnet_gn"
    config.optimizer.learning_rate = 1e-3
    config.train.batch_size = 32
    config.train.steps = 2000
    return config
