"""``fedjax-med infer``: a CryptoNets served on encrypted images agrees with plaintext inference."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.cli import infer as infer_cli
from fedjax_med.cli import main as cli
from fedjax_med.config import base
from fedjax_med.models import cryptonets
from fedjax_med.secure import he_ckks, he_inference

ts = pytest.importorskip("tenseal")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"
# 16x16 images, 2 maps of 4x4 with stride 3 (5x5 windows), 8 hidden units: a seconds-long model.
CRYPTONETS = [
    "--config.data.cache_dir=none",
    "--config.train.num_devices=1",
    "--config.data.synthetic.image_size=16",
    "--config.model.name=cryptonets",
    "--config.model.kwargs.maps=2",
    "--config.model.kwargs.kernel=4",
    "--config.model.kwargs.stride=3",
    "--config.model.kwargs.hidden=8",
    "--config.train.steps=2",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cryptonets"))
    assert cli.main(["train", "--config", QUICK, "--workdir", path, "--quiet", *CRYPTONETS]) == 0
    return path


LAYOUT = he_inference.Layout(16, 16, 1, 4, 3)


@pytest.fixture(scope="module")
def hospital():
    """One hospital key set (Galois key generation takes the seconds) for the whole module."""
    return he_inference.InferenceClient(LAYOUT)


def _infer(capsys, *args):
    capsys.readouterr()
    assert cli.main(["infer", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_encrypted_logits_equal_plaintext_logits(workdir, hospital, capsys, monkeypatch):
    def same_hospital(layout):
        assert layout == LAYOUT
        return hospital

    monkeypatch.setattr(he_inference, "InferenceClient", same_hospital)
    plain = _infer(capsys, "--workdir", workdir, "--num-images", "2")
    enc = _infer(capsys, "--workdir", workdir, "--num-images", "2", "--encrypted")
    assert not plain["encrypted"] and enc["encrypted"] and enc["num_images"] == 2
    got, want = np.array(enc["logits"]), np.array(plain["logits"])
    # CKKS at scale 2^30: errors near 1e-3 of the logits; 1e-2 leaves room, argmax must agree.
    assert np.abs(got - want).max() <= 1e-2 * (1.0 + np.abs(want).max())
    assert enc["predictions"] == plain["predictions"]
    assert enc["plaintext_check"]["agreement"] == 1.0
    assert enc["bytes"]["image_ciphertext_per_image"] > 0 and enc["seconds"]["per_image"] > 0


def test_the_model_owner_never_holds_the_secret_key(hospital):
    module = cryptonets.cryptonets(3, maps=2, kernel=4, stride=3, hidden=8)
    image = np.random.default_rng(0).normal(size=(16, 16, 1))
    params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
    weights = he_inference.CryptoNetsWeights.from_params(params)
    owner = he_inference.ModelOwner(weights, LAYOUT, hospital.context)
    assert not hospital.context.has_secret_key() and not owner.context.has_secret_key()
    reply = owner.evaluate(hospital.encrypt(image))
    with pytest.raises(ValueError, match="secret_key"):  # the owner cannot read its own output
        ts.ckks_vector_from(owner.context, reply).decrypt()
    want = np.asarray(module.apply({"params": params}, image[None]))[0]
    assert np.abs(hospital.decrypt(reply) - want).max() <= 1e-2 * (1.0 + np.abs(want).max())
    # A context that still carries a secret key is refused by the owner.
    with_secret = he_ckks.KeyHolder(he_ckks.CKKSParameters(4096))._context
    with pytest.raises(ValueError, match="secret key"):
        he_inference.ModelOwner(weights, LAYOUT, with_secret)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-images", "0"], "--num-images=0 must be >= 1"),
        (["--input", "{bad}"], "must be (H, W, C) or (B, H, W, C)"),
    ],
)
def test_bad_infer_inputs_are_one_line(workdir, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 7, 7, 1), np.uint8))
    args = [a.replace("{bad}", str(bad)) for a in args]
    assert cli.main(["infer", "--workdir", workdir, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_encrypted_inference_of_a_non_polynomial_model_is_refused():
    run = types.SimpleNamespace(config=base.get_base_config())  # model.name = small_cnn
    with pytest.raises(ValueError, match="must be 'cryptonets'"):
        infer_cli._layout(run)
