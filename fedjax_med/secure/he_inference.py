r"""Encrypted inference of a CryptoNets model: the hospital's image stays encrypted end to end.

Protocol (CKKS, Cheon et al. 2017, https://eprint.iacr.org/2016/421; the network of
Gilad-Bachrach et al. 2016, :mod:`fedjax_med.models.cryptonets`):

1. the **hospital** (:class:`InferenceClient`) generates a CKKS key pair and sends the model
   owner a public context (public, relinearisation and Galois keys; never the secret key);
2. it encodes its normalised image by im2col (one row of ``kernel^2`` pixels per convolution
   window, :func:`tenseal.im2col_encoding`), one ciphertext per input channel and strip of
   output rows (a strip holds as many windows as fit the ``N / 2`` slots), and encrypts it;
3. the **model owner** (:class:`ModelOwner`) evaluates the network on the ciphertexts with its
   plaintext weights: ``conv_o = sum_c enc_c * K[:, :, c, o] + b_o`` (one plaintext
   multiplication and ``log2 kernel^2`` rotations, ``conv2d_im2col``), ``conv_o^2``, the first
   dense layer as ``sum_o conv_o^2 @ W1[block o]`` (the diagonal method of Halevi and Shoup, one
   rotation per row), ``h^2``, the second dense layer; it returns the encrypted logits;
4. the hospital decrypts the logits.

The owner never holds the secret key (:class:`ModelOwner` refuses a context that has one), so it
learns nothing about the image but its size; the hospital learns the logits. The weights stay
with the owner (CryptoNets' setting; hiding the weights from the hospital is not claimed: the
logits of chosen inputs reveal a model, as for any prediction API).

CKKS parameters: ``N = 8192`` (4,096 slots), coefficient moduli ``(33, 30, 30, 30, 30, 30, 35)``
bits (218 bits, the 128-bit security limit at ``N = 8192``), scale ``2^30``: the depth is 5
(conv weight, square, dense, square, dense), one 30-bit prime per rescale. The last level keeps
only the 33-bit prime, room for values below ``2^(33 - 30 - 1) = 4``: the owner evaluates the
last layer divided by ``LOGIT_SCALE = 64`` and the hospital multiplies back, so logits up to
``256`` in magnitude decrypt correctly (a trained CryptoNets on normalised images stays far
below; larger ones would wrap around, so the CLI checks agreement on the plaintext model it has).
The error is approximate: key switching and rescaling add noise of about ``2^-30`` relative to
each layer's values, measured at ~1e-3 of the logits, well below the gaps that decide a
prediction; :func:`agreement` measures it against plaintext inference.

Cost: the first dense layer takes one ciphertext rotation per row (``maps * H' * W'`` rows),
which dominates; the Galois keys make the public context large (~80 MB at ``N = 8192``), sent
once per hospital, not per image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_med.secure import he_ckks

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (33, 30, 30, 30, 30, 30, 35)
SCALE_BITS = 30
LOGIT_SCALE = 64.0  # the last layer runs divided by this, to fit the last level's modulus


@dataclasses.dataclass(frozen=True)
class Layout:
    """The public shape of the computation: image size and the convolution's window and stride."""

    height: int
    width: int
    channels: int
    kernel: int
    stride: int

    @property
    def out_shape(self) -> tuple[int, int]:
        return (
            (self.height - self.kernel) // self.stride + 1,
            (self.width - self.kernel) // self.stride + 1,
        )

    def strips(self, slots: int) -> list[tuple[int, int]]:
        """Output-row ranges ``[start, stop)`` whose im2col matrix fits ``slots`` each."""
        out_h, out_w = self.out_shape
        rows = slots // (out_w * self.kernel**2)
        if rows < 1:
            raise ValueError(
                f"one output row of {out_w} windows of {self.kernel}x{self.kernel} exceeds the "
                f"{slots} CKKS slots: use a larger stride or a smaller image"
            )
        return [(r, min(r + rows, out_h)) for r in range(0, out_h, rows)]


@dataclasses.dataclass(frozen=True)
class CryptoNetsWeights:
    """Plaintext weights of a CryptoNets model as the encrypted evaluator uses them."""

    conv_kernel: np.ndarray  # (k, k, C, maps)
    conv_bias: np.ndarray  # (maps,)
    dense1: np.ndarray  # (maps * H' * W', hidden), channel-major rows
    bias1: np.ndarray
    dense2: np.ndarray  # (hidden, num_outputs)
    bias2: np.ndarray

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CryptoNetsWeights:
        """From the params of :class:`fedjax_med.models.cryptonets.CryptoNets`."""
        get = lambda layer, name: np.asarray(params[layer][name], np.float64)  # noqa: E731
        return cls(
            get("conv", "kernel"),
            get("conv", "bias"),
            get("dense1", "kernel"),
            get("dense1", "bias"),
            get("dense2", "kernel"),
            get("dense2", "bias"),
        )


def _context(ts):
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES)
    )
    ctx.global_scale = 2.0**SCALE_BITS
    ctx.generate_galois_keys()
    return ctx


@dataclasses.dataclass(frozen=True)
class EncryptedImage:
    """The serialised ciphertexts of one image: ``blobs[strip][channel]``."""

    blobs: tuple[tuple[bytes, ...], ...]
    windows: tuple[int, ...]  # windows per strip

    @property
    def nbytes(self) -> int:
        return sum(len(b) for strip in self.blobs for b in strip)


class InferenceClient:
    """The hospital: holds the secret key apart from its public context; encrypts and decrypts.

    The context it encrypts with has the secret key removed (``make_context_public``) right
    after key generation; the key is kept only in this object and passed to ``decrypt``.
    """

    def __init__(self, layout: Layout):
        self._ts = he_ckks.import_tenseal()
        self.layout = layout
        context = _context(self._ts)
        self._secret_key = context.secret_key()
        context.make_context_public()
        self.context = context  # public, relinearisation and Galois keys only

    def public_context(self) -> bytes:
        """The bytes the model owner receives (seconds: ~80 MB of Galois keys, compressed)."""
        return self.context.serialize(save_galois_keys=True, save_relin_keys=True)

    def encrypt(self, image: np.ndarray) -> EncryptedImage:
        """``image`` (H, W, C), normalised as the model was trained, as im2col ciphertexts."""
        lay = self.layout
        image = np.asarray(image, np.float64)
        if image.shape != (lay.height, lay.width, lay.channels):
            raise ValueError(f"image.shape={image.shape} must be {(lay.height, lay.width)}")
        blobs, windows = [], []
        for start, stop in lay.strips(POLY_MODULUS_DEGREE // 2):
            rows = image[start * lay.stride : (stop - 1) * lay.stride + lay.kernel]
            per_channel = []
            for c in range(lay.channels):
                enc, count = self._ts.im2col_encoding(
                    self.context, rows[:, :, c].tolist(), lay.kernel, lay.kernel, lay.stride
                )
                per_channel.append(enc.serialize())
            blobs.append(tuple(per_channel))
            windows.append(count)
        return EncryptedImage(tuple(blobs), tuple(windows))

    def decrypt(self, logits: bytes) -> np.ndarray:
        """The logits under ``logits`` (the owner's reply), scaled back by ``LOGIT_SCALE``."""
        out = self._ts.ckks_vector_from(self.context, logits).decrypt(self._secret_key)
        return LOGIT_SCALE * np.asarray(out, np.float64)


class ModelOwner:
    """The model owner: evaluates CryptoNets on ciphertexts under the hospital's public context."""

    def __init__(self, weights: CryptoNetsWeights, layout: Layout, public_context):
        """``public_context``: :meth:`InferenceClient.public_context`'s bytes, or in this process

        the client's public context object itself (the same keys; no secret key in either).
        """
        self._ts = he_ckks.import_tenseal()
        self.weights, self.layout = weights, layout
        self.context = public_context
        if isinstance(public_context, bytes):
            self.context = self._ts.context_from(public_context)
        if self.context.has_secret_key():
            raise ValueError("the model owner must not receive the hospital's secret key")
        k, _, channels, _ = weights.conv_kernel.shape
        if (k, channels) != (layout.kernel, layout.channels):
            raise ValueError(f"weights of a {k}x{k}x{channels} conv do not fit {layout}")

    def evaluate(self, image: EncryptedImage) -> bytes:
        """Encrypted logits of one encrypted image (see the module docstring)."""
        w, ts = self.weights, self._ts
        out_h, out_w = self.layout.out_shape
        per_map = out_h * out_w
        h = None
        row = 0  # first window of the strip
        for blobs, count in zip(image.blobs, image.windows, strict=True):
            channels = [ts.ckks_vector_from(self.context, b) for b in blobs]
            for o in range(w.conv_kernel.shape[-1]):
                conv = None
                for c, enc in enumerate(channels):
                    term = enc.conv2d_im2col(w.conv_kernel[:, :, c, o].tolist(), count)
                    conv = term if conv is None else conv + term
                conv = (conv + [float(w.conv_bias[o])] * count).square()
                block = w.dense1[o * per_map + row : o * per_map + row + count]
                part = conv.mm(block.tolist())
                h = part if h is None else h + part
            row += count
        h = (h + w.bias1.tolist()).square()
        logits = h.mm((w.dense2 / LOGIT_SCALE).tolist()) + (w.bias2 / LOGIT_SCALE).tolist()
        return logits.serialize()


def encrypted_logits(
    weights: CryptoNetsWeights,
    layout: Layout,
    images: Sequence[np.ndarray],
    *,
    serialize_context: bool = True,
) -> tuple[np.ndarray, dict[str, float]]:
    """Runs the whole protocol on ``images`` (B, H, W, C): logits (B, K) and its byte counts.

    ``serialize_context=False`` hands the owner the public context as an object (the same keys,
    without the seconds of serialising ~80 MB of Galois keys); its size is then not reported.
    """
    hospital = InferenceClient(layout)
    public = hospital.public_context() if serialize_context else hospital.context
    owner = ModelOwner(weights, layout, public)
    logits, sent, received = [], [], []
    for image in images:
        encrypted = hospital.encrypt(image)
        reply = owner.evaluate(encrypted)
        sent.append(encrypted.nbytes)
        received.append(len(reply))
        logits.append(hospital.decrypt(reply))
    sizes = {
        "public_context_bytes": float(len(public)) if serialize_context else math.nan,
        "image_ciphertext_bytes": float(np.mean(sent)),
        "logits_ciphertext_bytes": float(np.mean(received)),
    }
    return np.stack(logits), sizes


def agreement(encrypted: np.ndarray, plain: np.ndarray) -> dict[str, float]:
    """Share of equal argmax predictions and the largest logit gap, encrypted vs plaintext."""
    encrypted, plain = np.asarray(encrypted), np.asarray(plain)
    if plain.shape[-1] == 1:  # binary: one logit, the sign decides
        same = (encrypted[:, 0] > 0) == (plain[:, 0] > 0)
    else:
        same = encrypted.argmax(-1) == plain.argmax(-1)
    return {
        "agreement": float(np.mean(same)),
        "max_abs_logit_error": float(np.max(np.abs(encrypted - plain))),
    }
