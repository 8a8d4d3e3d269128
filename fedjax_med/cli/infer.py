"""``infer`` command line: a trained model's logits, in plaintext or on an encrypted image.

Examples (through the project's main command)::

    fedjax-med infer --workdir runs/cryptonets --num-images 2
    fedjax-med infer --workdir runs/cryptonets --encrypted --input images.npy

With ``--encrypted`` the hospital side (:class:`fedjax_med.secure.he_inference.InferenceClient`)
normalises and encrypts each image under its own CKKS key, the model owner side
(:class:`~fedjax_med.secure.he_inference.ModelOwner`, public context only) evaluates the
CryptoNets model on the ciphertexts and the hospital decrypts the logits. Both sides run in this
process; the output says what each sent and how long each step took, and compares the decrypted
logits with plaintext inference of the same model (agreement of predictions, largest logit gap).
Encrypted inference needs ``model.name = "cryptonets"`` (polynomial activations) and
``pip install 'fedjax_med[he]'``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import numpy as np

from fedjax_med.secure import he_inference
from fedjax_med.trainers import registry


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``infer`` command; the parsed namespace carries ``func=run``."""
    parser = subparsers.add_parser(
        "infer",
        help="logits of a trained model, optionally on an encrypted image (CKKS)",
        description="Predict with the latest checkpoint of --workdir on --input images (a .npy "
        "file of (H, W, C) or (B, H, W, C), uint8 or floats in [0, 1]) or on the first "
        "--num-images of --split. --encrypted evaluates a cryptonets model on CKKS ciphertexts.",
    )
    parser.add_argument("--workdir", required=True, help="folder of a run made by train")
    parser.add_argument("--encrypted", action="store_true", help="encrypt the images (CKKS)")
    parser.add_argument("--input", default=None, help=".npy images; default: --split images")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--num-images", type=int, default=2, help="images of --split (>= 1)")
    parser.add_argument(
        "--send-context",
        action="store_true",
        help="serialise the public context as a real transfer would and report its bytes "
        "(~80 MB of Galois keys: seconds); default: the owner uses it in process",
    )
    parser.add_argument(
        "--site", type=int, default=0, help="site whose normalisation --input images get"
    )
    parser.set_defaults(func=run)
    return parser


def _images(run, args) -> tuple[np.ndarray, np.ndarray]:
    """(normalised float images, sites) of ``--input`` or of ``--split``."""
    if args.input is None:
        data = run.splits.split(args.split)
        raw, sites = data.images[: args.num_images], data.sites[: args.num_images]
    else:
        raw = np.load(args.input, allow_pickle=False)
        raw = raw[None] if raw.ndim == 3 else raw
        num_sites = run.normalizer.mean.shape[0]
        if not 0 <= args.site < num_sites:
            raise ValueError(f"--site={args.site} must be in [0, {num_sites}) (the run's sites)")
        sites = np.full(raw.shape[0], args.site)
    if raw.ndim != 4 or tuple(raw.shape[1:]) != run.model.input_shape:
        raise ValueError(
            f"--input images of shape {raw.shape} must be (H, W, C) or (B, H, W, C) with "
            f"(H, W, C) = {run.model.input_shape}, the model's input"
        )
    return run.normalizer(raw, sites), sites


def _layout(run) -> he_inference.Layout:
    if run.config.model.name != "cryptonets":
        raise ValueError(
            f"--encrypted needs a model with polynomial activations: config field "
            f"'model.name'={run.config.model.name!r} must be 'cryptonets'"
        )
    module = run.model.module
    return he_inference.Layout(*run.model.input_shape, module.kernel, module.stride)


def _predictions(logits: np.ndarray) -> list[int]:
    """Predicted class per image (binary: the sign of the one logit)."""
    if logits.shape[-1] == 1:
        return (logits[:, 0] > 0).astype(int).tolist()
    return logits.argmax(-1).tolist()


def infer(workdir: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``infer`` result: logits and predictions; with ``--encrypted`` the costs too."""
    if args.num_images < 1:
        raise ValueError(f"--num-images={args.num_images} must be >= 1")
    run = registry.restore(workdir)
    images, _ = _images(run, args)
    plain = np.asarray(run.model.apply(run.params, images), np.float64)
    out: dict[str, Any] = {"encrypted": bool(args.encrypted), "num_images": int(len(images))}
    if not args.encrypted:
        out.update(logits=plain.tolist(), predictions=_predictions(plain))
        return out
    layout = _layout(run)
    weights = he_inference.CryptoNetsWeights.from_params(run.params)
    tic = time.perf_counter()
    hospital = he_inference.InferenceClient(layout)
    public = hospital.public_context() if args.send_context else hospital.context
    owner = he_inference.ModelOwner(weights, layout, public)
    setup_s = time.perf_counter() - tic
    logits, steps, sizes = [], {"encrypt": 0.0, "evaluate": 0.0, "decrypt": 0.0}, []
    for image in images:
        tic = time.perf_counter()
        encrypted = hospital.encrypt(image)  # hospital
        mid = time.perf_counter()
        reply = owner.evaluate(encrypted)  # model owner: ciphertexts and public keys only
        end = time.perf_counter()
        logits.append(hospital.decrypt(reply))  # hospital
        steps["encrypt"] += mid - tic
        steps["evaluate"] += end - mid
        steps["decrypt"] += time.perf_counter() - end
        sizes.append((encrypted.nbytes, len(reply)))
    logits = np.stack(logits)
    out.update(
        logits=logits.tolist(),
        predictions=_predictions(logits),
        plaintext_check=he_inference.agreement(logits, plain),
        seconds={
            "keys_and_context": setup_s,
            **{f"{k}_per_image": v / len(images) for k, v in steps.items()},
            "per_image": sum(steps.values()) / len(images),
        },
        bytes={
            "public_context": len(public) if args.send_context else None,
            "image_ciphertext_per_image": float(np.mean([s[0] for s in sizes])),
            "logits_ciphertext_per_image": float(np.mean([s[1] for s in sizes])),
        },
        peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        ckks={
            "poly_modulus_degree": he_inference.POLY_MODULUS_DEGREE,
            "coeff_mod_bit_sizes": list(he_inference.COEFF_MOD_BIT_SIZES),
            "scale_bits": he_inference.SCALE_BITS,
        },
    )
    return out


def run(args: argparse.Namespace) -> int:
    """``fedjax-med infer``: prints the result as JSON (a missing extra is a user error)."""
    try:
        result = infer(args.workdir, args)
    except ImportError as err:  # tenseal absent: the message names the install command
        raise ValueError(str(err)) from None
    print(json.dumps(result, indent=2))
    return 0
