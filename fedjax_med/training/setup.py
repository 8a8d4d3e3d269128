"""What every trainer builds first: the data splits, their normaliser and the model."""

from __future__ import annotations

import ml_collections

from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import preprocess, sources
from fedjax_med.models import registry


def build_data_and_model(
    config: ml_collections.ConfigDict,
) -> tuple[dataset_lib.DatasetSplits, preprocess.Normalizer, registry.Model]:
    """The splits of ``config.data``, their normaliser and the model sized for them."""
    splits = sources.load_splits(config.data, config.seed)
    info = splits.info
    normalizer = preprocess.fit_normalizer(
        splits.train,
        len(info.site_names),
        method=config.data.normalization,
        mean=config.data.mean,
        std=config.data.std,
    )
    model = registry.get_model(
        config.model.name,
        input_shape=info.image_shape,
        num_outputs=info.num_outputs,
        **config.model.kwargs.to_dict(),
    )
    return splits, normalizer, model
