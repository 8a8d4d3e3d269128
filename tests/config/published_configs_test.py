"""Published DP-SGD recipes: dp_tramer_boneh (Tramer & Boneh 2021), dp_de_wrn (De et al. 2022)."""

import pytest

from fedjax_med.config import loading, schema
from fedjax_med.configs import dp_tramer_boneh


@pytest.mark.parametrize(
    ("variant", "model", "batch", "lr", "sigma"),
    [
        ("cnn", "small_cnn", 2048, 4.0, 2.15),
        ("scatter_linear", "scatter_linear", 8192, 16.0, 4.05),
        ("scatter_cnn", "scatter_cnn", 2048, 4.0, 2.15),
    ],
)
def test_variants_carry_the_published_hyperparameters(variant, model, batch, lr, sigma):
    config = schema.validate(loading.load_config(f"dp_tramer_boneh:{variant}"))
    assert config.model.name == model and config.train.batch_size == batch
    assert config.optimizer.learning_rate == lr and config.optimizer.momentum == 0.9
    assert config.privacy.noise_multiplier == sigma and config.privacy.clip_norm == 0.1
    assert (config.privacy.target_epsilon, config.privacy.delta) == (3.0, 1e-5)
    epochs = config.train.steps * batch / dp_tramer_boneh.TRAIN_SIZE
    assert epochs == pytest.approx(dp_tramer_boneh.RECIPES[variant][4], rel=0.01)
    tiny = schema.validate(loading.load_config(f"dp_tramer_boneh:{variant},tiny"))
    assert tiny.model.name == model and tiny.data.name == "synthetic" and tiny.train.steps <= 4


def test_two_variants_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        loading.load_config("dp_tramer_boneh:cnn,scatter_cnn")


def test_data_norm_variant_normalises_with_private_statistics():
    config = loading.load_config("dp_tramer_boneh:scatter_linear,data_norm")
    assert (config.model.kwargs.norm, config.model.kwargs.norm_noise) == ("data", 8.0)
    with pytest.raises(ValueError, match="data_norm goes with a ScatterNet variant"):
        loading.load_config("dp_tramer_boneh:cnn,data_norm")


def test_de_wrn_carries_the_published_recipe():
    config = schema.validate(loading.load_config("dp_de_wrn"))
    assert config.model.name == "wrn_16_4" and config.train.batch_size == 4096
    assert (config.privacy.augmult, config.train.ema_decay) == (16, 0.999)
    assert (config.privacy.noise_multiplier, config.train.steps) == (3.0, 2468)
    assert config.privacy.target_epsilon == 8.0 and config.optimizer.learning_rate == 4.0
    assert loading.load_config("dp_de_wrn:eps1").train.steps == 875
    assert schema.validate(loading.load_config("dp_de_wrn:tiny")).train.steps == 2
