r"""Synthetic multi-site medical imaging benchmark: seeded, downloadless, cached.

The default dataset of fedjax_med: grayscale "mammography-like" patches from ``num_sites``
hospitals, each with its own scanner, patient mix and class prevalence, so that federated
(non-IID), patient-level privacy and subgroup experiments run anywhere in seconds. Generation is
vectorised NumPy and depends only on :class:`SyntheticSpec` (``seed`` included).

Generative model (lengths in pixels, ``u = S / 32`` for ``image_size = S``; intensities in
``[0, 1]``, quantised to uint8 at the end; ``h = site_heterogeneity``; ``U`` is uniform):

**Patients.** Site ``s`` holds ``P_s = max(1, round(n_s / m))`` patients, ``m =
images_per_patient``, with ``1 + Poisson(m - 1)`` images each. A patient has a sex (1/2 each), an
age band ``a`` in ``("<40", "40-60", ">60")`` drawn from ``softmax(log(.3, .4, .3) + .3 h z_s)``,
``z_s ~ N(0, I)`` per site, and one class ``k`` with ``p(k | s, a) ∝ pi_s[k] exp(.2 a [k > 0])``
(lesions slightly more likely with age). All images of a patient share the class, the tissue
parameters and the lesion's size and shape; lesion position and orientation are redrawn per image
(other views of the same lesion).

**Tissue** of image ``i`` of patient ``p``::

    t_i = mu_p + c_p T_i,   T_i = G_{l_p} * (sqrt(.6) W_p + sqrt(.4) W_i) / std

with white noises ``W_p`` (per patient) and ``W_i`` (per image), ``G_l`` a periodic Gaussian
low-pass of std ``l_p ~ U(1.5, 3) u`` (mean removed, unit std), ``mu_p ~ U(.3, .5)``,
``c_p ~ U(.04, .08)``: the textures of one patient's images correlate at 0.6.

**Lesions.** Every image, normal or not, gets added intensity of the same total "mass"
``M_i = 20 u^2 U(.8, 1.25)`` (summed over pixels) around a centre uniform in ``[S/4, 3S/4]^2``,
so neither total brightness nor pixel position gives the class away; only spatial structure does.
Each shape is softened by a Gaussian of std ``.6 u`` (thin strokes) and scaled to sum to ``M_i``:

* ``normal``: 6-10 faint fibroglandular islands, Gaussians of std ``U(2, 3) u`` at independent
  uniform positions in the same window (no focal finding).
* ``mass``: a solid ellipse, semi-axes ``r_p sqrt(q_p)`` and ``r_p / sqrt(q_p)``,
  ``r_p ~ U(3, 4.5) u``, ``q_p ~ U(1, 1.5)``, random orientation.
* ``calcifications``: 5-8 tiny bright dots uniform in a disc of radius ``U(3.5, 5.5) u``.
* ``architectural_distortion``: 4-7 thin spicules of length ``U(4.5, 7) u`` radiating, evenly
  spaced (jitter ``U(-.3, .3)`` rad), from ``1.5 u`` around the centre.
* ``cyst`` (``num_classes = 5``): a thin ring of radius ``r_p``.

``num_classes = K`` keeps the first ``K`` classes; ``K = 2`` is the binary task normal vs mass.

**Site effects**, drawn per site from the seed; every range scales with ``h``, ``h = 0`` gives
identical sites (up to sampling)::

    x = clip(g_s B_s blur_{b_s}(t + lesion) + o_s + sigma_s eps, 0, 1)

* offset ``o_s = .06 h U(-1, 1)``; gain (contrast) ``g_s = exp(.2 h U(-1, 1))``;
* noise ``sigma_s = .03 exp(.5 h U(-1, 1))``, ``eps ~ N(0, 1)`` per pixel;
* Gaussian blur of std ``b_s = .8 h U(0, 1) u``;
* bias field ``B_s(x, y) = exp(h sum_j a_sj phi_j(x, y))``, ``phi = (x, y, xy, x^2 - 1/3,
  y^2 - 1/3)`` on ``[-1, 1]^2``, ``a_sj ~ U(-.1, .1)``;
* class prevalence ``pi_s ~ Dirichlet(4 / h^2, ..., 4 / h^2)`` (uniform when ``h = 0``);
* size ``n_s = max(1, round(examples_per_site (1 + .5 h v_s)))`` with ``v_s = 2 (pi(s) +
  U(0, 1)) / num_sites - 1`` for a random permutation ``pi``: sizes spread evenly over
  ``.5x``-``1.5x`` at ``h = 1`` and average ``examples_per_site``.

Site prevalence and site intensity are confounded, as in real multi-site data, so a linear model
on pixels beats chance a little when ``h > 0``; at ``h = 0`` it is near chance. Clipping at 1 trims
the brightest calcification dots slightly, the only (tiny) class difference in mean brightness.

**Masks** (``masks=True``, the segmentation task): the lesion of image ``i`` drawn with the
Gaussian of std ``.6 u`` but without the scanner's blur, ``m_i``; pixel ``x`` belongs to the
lesion where ``m_i(x) >= .3 max m_i``, and gets the image's class ``k`` (0, background,
elsewhere and on every ``normal`` image, whose islands are tissue, not findings). The masks use no
random draw, so the images are the same bytes with and without them; the image-level class is
kept as the subgroup ``finding``.

**Volumes** (``depth = D > 0``, ``u = S / 32`` as above, voxels isotropic): the same sites,
patients and classes, rendered as ``(D, S, S)`` volumes. The tissue is the 3-D analogue (white
noise low-passed in 3-D, patient correlation 0.6); every volume gets lesion mass
``M_i = 100 u^3 U(.8, 1.25)`` (so a mass lesion's voxels are about as bright as its 2-D pixels)
around a centre uniform in the middle half of each axis: ``normal`` 6-10 faint 3-D Gaussian
islands, ``mass`` a solid ellipsoid (semi-axes ``r_p sqrt(q_p)``, ``r_p / sqrt(q_p)``, ``r_p``,
rotated in-plane), ``calcifications`` 5-8 dots in a ball, ``architectural_distortion`` 4-7
spicules in random 3-D directions, ``cyst`` a spherical shell.
The site's blur is 3-D, its bias field is the 2-D one on every slice, offset, gain and noise as
above.

Splits are by patient within each site (:func:`fedjax_med.data.dataset.split_by_patient`).
:func:`load_synthetic` caches the arrays as one ``.npz`` per spec.

Examples:
    >>> from fedjax_med.data import synthetic
    >>> spec = synthetic.SyntheticSpec(num_sites=2, examples_per_site=60, image_size=16)
    >>> splits = synthetic.generate(spec)
    >>> splits.train.images.shape[1:], splits.train.images.dtype
    ((16, 16, 1), dtype('uint8'))
    >>> splits.info.class_names
    ('normal', 'mass', 'calcifications', 'architectural_distortion')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile

import numpy as np

from fedjax_med.data import dataset

# Bump when the generative model changes, so stale cache files are not reused.
GENERATOR_VERSION = 1

CLASS_NAMES = ("normal", "mass", "calcifications", "architectural_distortion", "cyst")
SEX_NAMES = ("female", "male")
AGE_BAND_NAMES = ("<40", "40-60", ">60")

_INTEGER_FIELDS = ("num_sites", "examples_per_site", "image_size", "num_classes", "seed", "depth")
_SPLITS = ("train", "val", "test")
_FIELDS = ("images", "labels", "sites", "patient_ids", "sex", "age_band")
# Stream ids for np.random.default_rng([seed, stream, (site)]): one independent stream per purpose.
_SITE_STREAM, _IMAGE_STREAM, _SPLIT_STREAM, _SIZE_STREAM = 0, 1, 2, 3
_PATIENT_CORRELATION = 0.6
_MASS = 20.0  # mean added lesion intensity, summed over pixels, at 32x32
_MASS_3D = 100.0  # the same summed over voxels, at 32x32x32
_HUB = 1.5  # spicules start this far (pixels at 32x32) from the distortion's centre
_LESION_WIDTH = 0.6  # std (pixels at 32x32) of the Gaussian that draws lesion skeletons
_MASK_LEVEL = 0.3  # a mask pixel reaches this fraction of its lesion's peak intensity


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the synthetic benchmark (the cache key hashes all fields)."""

    num_sites: int = 6
    examples_per_site: int = 1200  # mean; sites differ in size
    image_size: int = 32  # 32 or 64 typical; any >= 16
    num_classes: int = 4
    images_per_patient: int = 3  # mean images per patient (>= 1)
    site_heterogeneity: float = 1.0  # 0 = identical sites, 1 = default realistic shifts
    depth: int = 0  # 0: images (S, S); D >= 8: volumes (D, S, S)
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    seed: int = 0
    masks: bool = False  # labels are per-pixel lesion masks (task "segmentation")


def validate_spec(spec: SyntheticSpec) -> SyntheticSpec:
    """Raises ``ValueError`` naming the field and its allowed range; returns ``spec``."""
    if not isinstance(spec.masks, bool):
        raise ValueError(f"masks={spec.masks!r} must be True or False")
    for f in dataclasses.fields(spec):
        if f.name == "masks":
            continue
        value = getattr(spec, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValueError(f"{f.name}={value!r} must be a number")
        if f.name in _INTEGER_FIELDS and not isinstance(value, int | np.integer):
            raise ValueError(f"{f.name}={value!r} must be an integer")
    checks = (
        ("num_sites", 1 <= spec.num_sites <= 10_000, ">= 1 and <= 10000"),
        ("examples_per_site", spec.examples_per_site >= 1, ">= 1"),
        ("image_size", 16 <= spec.image_size <= 1024, ">= 16 and <= 1024"),
        ("num_classes", 2 <= spec.num_classes <= len(CLASS_NAMES), f"in [2, {len(CLASS_NAMES)}]"),
        ("images_per_patient", spec.images_per_patient >= 1, ">= 1"),
        ("site_heterogeneity", 0 <= spec.site_heterogeneity <= 2, "in [0, 2]"),
        ("depth", spec.depth == 0 or 8 <= spec.depth <= 256, "0 (images) or in [8, 256]"),
        ("test_fraction", 0 < spec.test_fraction < 1, "in (0, 1)"),
        ("val_fraction", 0 < spec.val_fraction < 1, "in (0, 1)"),
        ("seed", spec.seed >= 0, ">= 0"),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name}={getattr(spec, name)!r} must be {allowed}")
    if spec.test_fraction + spec.val_fraction >= 1:
        raise ValueError(
            f"test_fraction + val_fraction = {spec.test_fraction + spec.val_fraction} must be < 1"
        )
    if spec.masks and spec.depth:
        raise ValueError(f"masks=True (segmentation) needs images: depth={spec.depth} must be 0")
    return spec


def dataset_info(spec: SyntheticSpec) -> dataset.DatasetInfo:
    """The :class:`DatasetInfo` of the benchmark described by ``spec``."""
    subgroups = {"sex": SEX_NAMES, "age_band": AGE_BAND_NAMES}
    if spec.masks:
        task, names = "segmentation", ("background", *CLASS_NAMES[1 : spec.num_classes])
        subgroups["finding"] = CLASS_NAMES[: spec.num_classes]
    else:
        task = "binary" if spec.num_classes == 2 else "multiclass"
        names = CLASS_NAMES[: spec.num_classes]
    return dataset.DatasetInfo(
        name="synthetic",
        task=task,
        num_classes=spec.num_classes,
        class_names=names,
        site_names=tuple(f"hospital_{s}" for s in range(spec.num_sites)),
        image_shape=(*((spec.depth,) if spec.depth else ()), spec.image_size, spec.image_size, 1),
        subgroup_names=subgroups,
    )


@dataclasses.dataclass(frozen=True)
class _Site:
    size: int
    prevalence: np.ndarray  # (K,)
    age_probs: np.ndarray  # (3,)
    offset: float
    gain: float
    noise: float
    blur: float  # Gaussian std in pixels
    bias: np.ndarray  # (S, S) multiplicative field


def _site(spec: SyntheticSpec, site: int, size_v: float) -> _Site:
    rng = np.random.default_rng([spec.seed, _SITE_STREAM, site])
    h, s, k = spec.site_heterogeneity, spec.image_size, spec.num_classes
    # Draw every variate whatever h is, so h only rescales the same underlying site.
    off_u, gain_u, noise_u, blur_u = rng.uniform(-1, 1, 4)
    bias_coef = rng.uniform(-0.1, 0.1, 5)
    age_z = rng.standard_normal(3)
    gammas = rng.standard_gamma(4 / max(h, 1e-3) ** 2, k)
    prevalence = gammas / gammas.sum() if h > 0 else np.full(k, 1 / k)
    age_logits = np.log([0.3, 0.4, 0.3]) + 0.3 * h * age_z
    age_probs = np.exp(age_logits) / np.exp(age_logits).sum()
    x = np.linspace(-1, 1, s)
    yy, xx = np.meshgrid(x, x, indexing="ij")
    basis = np.stack([xx, yy, xx * yy, xx**2 - 1 / 3, yy**2 - 1 / 3])
    return _Site(
        size=max(1, round(spec.examples_per_site * (1 + 0.5 * h * size_v))),
        prevalence=prevalence,
        age_probs=age_probs,
        offset=0.06 * h * off_u,
        gain=float(np.exp(0.2 * h * gain_u)),
        noise=float(0.03 * np.exp(0.5 * h * noise_u)),
        blur=0.8 * h * (blur_u + 1) / 2 * s / 32,
        bias=np.exp(h * np.tensordot(bias_coef, basis, axes=1)),
    )


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` (rows sum to 1), by inverse CDF."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.uniform(size=probs.shape[:-1] + (1,)) * cdf[..., -1:]
    return np.minimum((u > cdf).sum(-1), probs.shape[-1] - 1)


def _freq2(s: int) -> np.ndarray:
    """Squared spatial frequency (cycles / pixel) on the ``rfft2`` grid, ``(S, S // 2 + 1)``."""
    fy = np.fft.fftfreq(s)[:, None]
    fx = np.fft.rfftfreq(s)[None, :]
    return (fy**2 + fx**2).astype(np.float32)


def _gaussian_gain(f2: np.ndarray, std: np.ndarray | float) -> np.ndarray:
    """Fourier transform of a unit-sum Gaussian of standard deviation ``std`` pixels."""
    std = np.asarray(std, np.float32)
    std = std.reshape(std.shape + (1,) * f2.ndim)
    return np.exp(np.float32(-2 * np.pi**2) * std**2 * f2)


def _freq3(d: int, s: int) -> np.ndarray:
    """Squared spatial frequency on the ``rfftn`` grid of ``(D, S, S)``, ``(D, S, S // 2 + 1)``."""
    fz = np.fft.fftfreq(d)[:, None, None]
    fy = np.fft.fftfreq(s)[None, :, None]
    fx = np.fft.rfftfreq(s)[None, None, :]
    return (fz**2 + fy**2 + fx**2).astype(np.float32)


def _texture_std(shape: tuple[int, ...], length: np.ndarray) -> np.ndarray:
    """Std of white unit noise after the periodic low-pass ``length`` with the mean removed."""
    grids = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij", sparse=True)
    f2 = sum(g**2 for g in grids).astype(np.float32)
    power = _gaussian_gain(f2, length) ** 2
    return np.sqrt((power.sum(axis=tuple(range(-len(shape), 0))) - 1) / np.prod(shape))


def _fourier_white(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """``rfftn`` of ``n`` white fields of ``shape`` and unit variance, drawn in the Fourier domain.

    ``irfftn`` keeps only the Hermitian part of the last axis' frequencies 0 and S/2, halving
    their power; scaling them by sqrt(2) restores unit variance without a forward transform.
    """
    *lead, s = shape
    parts = rng.standard_normal((n, *lead, s // 2 + 1, 2), dtype=np.float32)
    spectrum = parts.view(np.complex64)[..., 0]
    spectrum *= np.float32(np.sqrt(np.prod(shape)) / np.sqrt(2))
    spectrum[..., 0] *= np.float32(np.sqrt(2))
    if s % 2 == 0:
        spectrum[..., -1] *= np.float32(np.sqrt(2))
    return spectrum


def _splat(out: np.ndarray, image: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
    """Adds unit points at sub-pixel ``(y, x)`` of ``out[image]`` with bilinear weights.

    Points outside the image are dropped (piling them on the border would draw a bright edge).
    """
    n, s, _ = out.shape
    inside = (y >= 0) & (y < s - 1) & (x >= 0) & (x < s - 1)
    image, y, x = image[inside], y[inside], x[inside]
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    base = (image * s + y0) * s + x0
    index = np.concatenate([base, base + 1, base + s, base + s + 1])
    weight = np.concatenate([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    out += np.bincount(index, weight, minlength=out.size).reshape(out.shape).astype(out.dtype)


def _lesion_shapes(rng: np.random.Generator, num_patients: int, u: float) -> tuple:
    """Per-patient lesion shape draws (module docstring): island count and spread, mass radius
    and axis ratio, dot count and cluster radius, spicule count and length."""
    return (
        rng.integers(6, 11, num_patients),
        rng.uniform(2.0, 3.0, num_patients) * u,
        rng.uniform(3.0, 4.5, num_patients) * u,
        rng.uniform(1.0, 1.5, num_patients),
        rng.integers(5, 9, num_patients),
        rng.uniform(3.5, 5.5, num_patients) * u,
        rng.integers(4, 8, num_patients),
        rng.uniform(4.5, 7.0, num_patients) * u,
    )


def _lesion_skeletons(
    rng: np.random.Generator, labels: np.ndarray, pid: np.ndarray, num_patients: int, s: int
) -> np.ndarray:
    """Unblurred lesion intensity ``(n, S, S)``; each image sums to its mass ``M_i``."""
    n = len(labels)
    u = s / 32
    # Per-patient shape parameters (the same lesion seen in several images).
    blobs_p, spread_p, size_p, ratio_p, count_p, cluster_p, lines_p, length_p = _lesion_shapes(
        rng, num_patients, u
    )
    # Per-image position, orientation and mass.
    margin = s / 4
    cy, cx = rng.uniform(margin, s - 1 - margin, (2, n))
    by, bx = rng.uniform(margin, s - 1 - margin, (2, n, 10)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n)
    jitter = rng.uniform(-0.3, 0.3, (n, 7))
    radius = np.sqrt(rng.uniform(0, 1, (n, 8)))
    theta = rng.uniform(0, 2 * np.pi, (n, 8))
    mass = _MASS * u**2 * rng.uniform(0.8, 1.25, n)

    out = np.zeros((n, s, s), np.float32)
    grid = np.arange(s, dtype=np.float32)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        p = pid[idx]
        dy = grid[None, :, None] - cy[idx, None, None].astype(np.float32)
        dx = grid[None, None, :] - cx[idx, None, None].astype(np.float32)
        if k == 0:  # normal: faint scattered fibroglandular islands
            inv = (-0.5 / spread_p[p] ** 2).astype(np.float32)[:, None]
            for j in range(10):
                on = (j < blobs_p[p]).astype(np.float32)[:, None]
                gy = np.exp((grid[None, :] - by[idx, j, None]) ** 2 * inv) * on
                gx = np.exp((grid[None, :] - bx[idx, j, None]) ** 2 * inv)
                out[idx] += gy[:, :, None] * gx[:, None, :]
        elif k == 1:  # mass: solid ellipse
            c = np.cos(angle[idx]).astype(np.float32)[:, None, None]
            sn = np.sin(angle[idx]).astype(np.float32)[:, None, None]
            a2 = (size_p[p] ** 2 * ratio_p[p]).astype(np.float32)[:, None, None]
            b2 = (size_p[p] ** 2 / ratio_p[p]).astype(np.float32)[:, None, None]
            out[idx] = (c * dx + sn * dy) ** 2 / a2 + (c * dy - sn * dx) ** 2 / b2 <= 1
        elif k == 2:  # calcifications: cluster of tiny dots
            on = np.arange(8)[None, :] < count_p[p][:, None]
            r = radius[idx] * cluster_p[p][:, None]
            img = np.broadcast_to(idx[:, None], on.shape)
            py = cy[idx, None] + r * np.sin(theta[idx])
            px = cx[idx, None] + r * np.cos(theta[idx])
            _splat(out, img[on], py[on], px[on])
        elif k == 3:  # architectural distortion: spiculated star of thin lines
            q = int(np.ceil(2 * 7 * u)) + 1
            t = _HUB * u + np.linspace(0, 1, q)[None, None, :] * length_p[p][:, None, None]
            # Spicules spread evenly around the hub, each angle jittered by up to 0.3 rad.
            spoke = angle[idx, None] + 2 * np.pi * np.arange(7) / lines_p[p][:, None]
            spoke += jitter[idx]
            py = cy[idx, None, None] + t * np.sin(spoke)[..., None]
            px = cx[idx, None, None] + t * np.cos(spoke)[..., None]
            on = np.broadcast_to((np.arange(7)[None, :] < lines_p[p][:, None])[..., None], py.shape)
            img = np.broadcast_to(idx[:, None, None], py.shape)
            _splat(out, img[on], py[on], px[on])
        else:  # cyst: ring
            q = int(np.ceil(2 * np.pi * 4.5 * u * 2))
            phi = np.linspace(0, 2 * np.pi, q, endpoint=False)[None, :] + angle[idx, None]
            py = cy[idx, None] + size_p[p][:, None] * np.sin(phi)
            px = cx[idx, None] + size_p[p][:, None] * np.cos(phi)
            img = np.broadcast_to(idx[:, None], py.shape)
            _splat(out, img.ravel(), py.ravel(), px.ravel())
        total = out[idx].sum(axis=(1, 2), keepdims=True)
        out[idx] *= mass[idx, None, None].astype(np.float32) / total
    return out


def _draw_patients(spec: SyntheticSpec, params: _Site, rng: np.random.Generator):
    """``(num_patients, pid per image, sex, age band, class)`` of one site (module docstring)."""
    m = float(spec.images_per_patient)
    num_patients = max(1, round(params.size / m))
    counts = 1 + rng.poisson(m - 1, num_patients)
    pid = np.repeat(np.arange(num_patients), counts)
    sex = rng.integers(0, 2, num_patients)
    age = _categorical(rng, np.broadcast_to(params.age_probs, (num_patients, 3)))
    logits = np.log(params.prevalence)[None, :] + 0.2 * age[:, None] * (
        np.arange(spec.num_classes) > 0
    )
    probs = np.exp(logits)
    label = _categorical(rng, probs / probs.sum(-1, keepdims=True))
    return num_patients, pid, sex, age, label


def _tissue_draws(rng: np.random.Generator, num_patients: int, s: int) -> tuple:
    """Per-patient tissue mean ``mu_p``, contrast ``c_p`` and texture length ``l_p``."""
    mu = rng.uniform(0.3, 0.5, num_patients).astype(np.float32)
    contrast = rng.uniform(0.04, 0.08, num_patients)
    return mu, contrast, rng.uniform(1.5, 3.0, num_patients) * s / 32


def _generate_site(
    spec: SyntheticSpec, site: int, size_v: float, first_patient: int
) -> tuple[dataset.ImageDataset, int]:
    """All images of one site; returns them and the number of patients used."""
    params = _site(spec, site, size_v)
    rng = np.random.default_rng([spec.seed, _IMAGE_STREAM, site])
    s = spec.image_size
    num_patients, pid, sex, age, label = _draw_patients(spec, params, rng)
    n = len(pid)

    # Tissue: patient-shared plus per-image white noise, low-passed at the patient's length.
    mu, contrast, length = _tissue_draws(rng, num_patients, s)
    rho = _PATIENT_CORRELATION
    f2 = _freq2(s)
    # The scanner blur is folded into the same filters: the texture is periodic and lesions lie
    # inside the image, so blurring periodically in the Fourier domain matches a plain blur.
    scanner = _gaussian_gain(f2, params.blur)
    scale = (contrast / _texture_std((s, s), length)).astype(np.float32)[:, None, None]
    tissue_filter = scale * _gaussian_gain(f2, length) * scanner
    tissue_filter[:, 0, 0] = 0  # zero-mean texture: the patient's mean is mu alone
    shared = _fourier_white(rng, num_patients, (s, s))
    shared *= np.float32(np.sqrt(rho)) * tissue_filter
    spectrum = _fourier_white(rng, n, (s, s))
    spectrum *= np.float32(np.sqrt(1 - rho)) * tissue_filter[pid]
    spectrum += shared[pid]
    lesions = _lesion_skeletons(rng, label[pid], pid, num_patients, s)
    lesion_spectrum = np.fft.rfft2(lesions)
    spectrum += lesion_spectrum * (_gaussian_gain(f2, _LESION_WIDTH * s / 32) * scanner)

    # Scanner: (blur above), bias field, gain, offset, noise, 8-bit quantisation.
    x = np.fft.irfft2(spectrum, s=(s, s))
    images = _scan(rng, x, mu[pid], params)
    drawn = None
    if spec.masks:  # the lesions without the scanner's blur; no random draw
        drawn_spectrum = lesion_spectrum * _gaussian_gain(f2, _LESION_WIDTH * s / 32)
        drawn = np.fft.irfft2(drawn_spectrum, s=(s, s))
    data = _site_dataset(rng, images, site, first_patient, pid, label, sex, age, drawn)
    return data, num_patients


def _scan(rng: np.random.Generator, x: np.ndarray, mu: np.ndarray, params: _Site) -> np.ndarray:
    """uint8 ``(n, ..., 1)`` from tissue + lesions ``x`` ``(n, ...)``: the patient's mean ``mu``
    ``(n,)``, then the site's bias field, gain, offset, noise and 8-bit quantisation."""
    x += mu.reshape((-1,) + (1,) * (x.ndim - 1))
    x *= (params.gain * params.bias).astype(np.float32)
    x += np.float32(params.offset)
    x += np.float32(params.noise) * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)[..., None]


def _site_dataset(
    rng: np.random.Generator,
    images: np.ndarray,
    site: int,
    first_patient: int,
    pid: np.ndarray,
    label: np.ndarray,
    sex: np.ndarray,
    age: np.ndarray,
    drawn: np.ndarray | None = None,
) -> dataset.ImageDataset:
    """One site's examples in a shuffled order, with per-image metadata from per-patient arrays.

    With ``drawn`` (each image's lesion drawing, in generation order) the labels are the lesions'
    masks (:func:`lesion_masks`) and the image-level class becomes the subgroup ``finding``.
    """
    n = len(pid)
    order = rng.permutation(n)  # interleave patients, as an unsorted archive would
    pid = pid[order]
    subgroups = {"sex": sex[pid], "age_band": age[pid]}
    labels = label[pid].astype(np.int32)
    if drawn is not None:
        subgroups["finding"] = labels
        labels = lesion_masks(drawn[order], labels)
    return dataset.ImageDataset(
        images=images[order],
        labels=labels,
        sites=np.full(n, site, np.int32),
        patient_ids=(first_patient + pid).astype(np.int64),
        subgroups={k: v.astype(np.int32) for k, v in subgroups.items()},
    )


def _splat3(out: np.ndarray, volume: np.ndarray, points: np.ndarray) -> None:
    """Adds a unit at the nearest voxel of each ``points[j] = (z, y, x)`` of ``out[volume[j]]``;
    points outside the volume are dropped."""
    n, d, s, _ = out.shape
    z, y, x = np.rint(points).astype(np.int64).T
    inside = (z >= 0) & (z < d) & (y >= 0) & (y < s) & (x >= 0) & (x < s)
    index = ((volume[inside] * d + z[inside]) * s + y[inside]) * s + x[inside]
    out += np.bincount(index, minlength=out.size).reshape(out.shape).astype(out.dtype)


def _unit_vectors(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Directions uniform on the sphere, ``shape + (3,)``."""
    v = rng.standard_normal(shape + (3,))
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _volume_lesions(
    rng: np.random.Generator, labels: np.ndarray, pid: np.ndarray, num_patients: int, d: int, s: int
) -> np.ndarray:
    """Unblurred 3-D lesion intensity ``(n, D, S, S)``; each volume sums to its mass ``M_i``."""
    n, u = len(labels), s / 32
    blobs_p, spread_p, size_p, ratio_p, count_p, cluster_p, lines_p, length_p = _lesion_shapes(
        rng, num_patients, u
    )
    low = np.array([d / 4, s / 4, s / 4])
    high = np.array([d, s, s]) - 1 - low
    centre = rng.uniform(low, high, (n, 3))
    blob_at = rng.uniform(low, high, (n, 10, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n)
    dots = _unit_vectors(rng, (n, 8)) * np.cbrt(rng.uniform(0, 1, (n, 8)))[..., None]
    spokes = _unit_vectors(rng, (n, 7))
    mass = _MASS_3D * u**3 * rng.uniform(0.8, 1.25, n)

    out = np.zeros((n, d, s, s), np.float32)
    axes = [np.arange(k, dtype=np.float32) for k in (d, s, s)]
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        p = pid[idx]
        dz, dy, dx = (axes[a][None, :] - centre[idx, a, None].astype(np.float32) for a in range(3))
        if k == 0:  # normal: faint scattered islands, separable 3-D Gaussians
            inv = (-0.5 / spread_p[p] ** 2).astype(np.float32)[:, None]
            for j in range(10):
                on = (j < blobs_p[p]).astype(np.float32)[:, None]
                g = [
                    np.exp((axes[a][None, :] - blob_at[idx, j, a, None]) ** 2 * inv)
                    for a in range(3)
                ]
                out[idx] += (
                    (g[0] * on)[:, :, None, None] * g[1][:, None, :, None] * g[2][:, None, None, :]
                )
        elif k == 1:  # mass: solid ellipsoid, rotated in-plane
            c = np.cos(angle[idx]).astype(np.float32)[:, None, None, None]
            sn = np.sin(angle[idx]).astype(np.float32)[:, None, None, None]
            zz, yy, xx = dz[:, :, None, None], dy[:, None, :, None], dx[:, None, None, :]
            r2 = (size_p[p] ** 2).astype(np.float32)[:, None, None, None]
            q = ratio_p[p].astype(np.float32)[:, None, None, None]
            out[idx] = (c * xx + sn * yy) ** 2 / (r2 * q) + (c * yy - sn * xx) ** 2 * q / r2 + (
                zz**2 / r2
            ) <= 1
        elif k == 2:  # calcifications: tiny dots in a ball
            on = np.arange(8)[None, :] < count_p[p][:, None]
            points = centre[idx, None, :] + dots[idx] * cluster_p[p][:, None, None]
            volume = np.broadcast_to(idx[:, None], on.shape)
            _splat3(out, volume[on], points[on])
        elif k == 3:  # architectural distortion: spicules in random 3-D directions
            q = int(np.ceil(2 * 7 * u)) + 1
            t = _HUB * u + np.linspace(0, 1, q)[None, None, :] * length_p[p][:, None, None]
            points = centre[idx, None, None, :] + t[..., None] * spokes[idx][:, :, None, :]
            shape = points.shape[:-1]
            on = np.broadcast_to((np.arange(7)[None, :] < lines_p[p][:, None])[..., None], shape)
            volume = np.broadcast_to(idx[:, None, None], shape)
            _splat3(out, volume[on], points[on])
        else:  # cyst: spherical shell
            dist = np.sqrt(
                dz[:, :, None, None] ** 2 + dy[:, None, :, None] ** 2 + dx[:, None, None, :] ** 2
            )
            out[idx] = np.abs(dist - size_p[p].astype(np.float32)[:, None, None, None]) <= 0.5
        total = np.maximum(out[idx].sum(axis=(1, 2, 3), keepdims=True), 1e-6)
        out[idx] *= mass[idx, None, None, None].astype(np.float32) / total
    return out


def _generate_volume_site(
    spec: SyntheticSpec, site: int, size_v: float, first_patient: int
) -> tuple[dataset.ImageDataset, int]:
    """All volumes ``(n, D, S, S, 1)`` of one site (module docstring, "Volumes")."""
    params = _site(spec, site, size_v)
    rng = np.random.default_rng([spec.seed, _IMAGE_STREAM, site])
    d, s = spec.depth, spec.image_size
    num_patients, pid, sex, age, label = _draw_patients(spec, params, rng)
    n = len(pid)
    mu, contrast, length = _tissue_draws(rng, num_patients, s)
    rho = _PATIENT_CORRELATION
    f2 = _freq3(d, s)
    scanner = _gaussian_gain(f2, params.blur)
    scale = (contrast / _texture_std((d, s, s), length)).astype(np.float32)[:, None, None, None]
    tissue_filter = scale * _gaussian_gain(f2, length) * scanner
    tissue_filter[:, 0, 0, 0] = 0
    spectrum = _fourier_white(rng, n, (d, s, s))
    spectrum *= np.float32(np.sqrt(1 - rho)) * tissue_filter[pid]
    spectrum += (_fourier_white(rng, num_patients, (d, s, s)) * np.float32(np.sqrt(rho)))[pid] * (
        tissue_filter[pid]
    )
    lesions = _volume_lesions(rng, label[pid], pid, num_patients, d, s)
    lesion_filter = _gaussian_gain(f2, _LESION_WIDTH * s / 32) * scanner
    spectrum += np.fft.rfftn(lesions, axes=(1, 2, 3)) * lesion_filter
    x = np.fft.irfftn(spectrum, s=(d, s, s), axes=(1, 2, 3)).astype(np.float32)
    volumes = _scan(rng, x, mu[pid], params)
    return _site_dataset(rng, volumes, site, first_patient, pid, label, sex, age), num_patients


def lesion_masks(drawn: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """uint8 masks ``(n, S, S)``: class ``classes[i]`` where ``drawn[i] >= .3 max drawn[i]``.

    Class 0 (``normal``) images get empty masks.
    """
    peak = drawn.max(axis=(1, 2), keepdims=True)
    inside = (drawn >= _MASK_LEVEL * peak) & (peak > 0) & (classes[:, None, None] > 0)
    return np.where(inside, classes[:, None, None], 0).astype(np.uint8)


def generate(spec: SyntheticSpec) -> dataset.DatasetSplits:
    """Generates the benchmark described by ``spec`` (pure: same spec, same bytes).

    Args:
        spec: the benchmark's size, number of classes, site heterogeneity and seed.

    Returns:
        Train / val / test splits, split by patient within each site, validated.
    """
    validate_spec(spec)
    # Stratified size draws: one site per slice of [-1, 1], so sizes span the range evenly.
    size_rng = np.random.default_rng([spec.seed, _SIZE_STREAM])
    k = spec.num_sites
    size_v = 2 * (size_rng.permutation(k) + size_rng.uniform(size=k)) / k - 1
    sites, first = [], 0
    for site in range(spec.num_sites):
        render = _generate_volume_site if spec.depth else _generate_site
        data, used = render(spec, site, size_v[site], first)
        sites.append(data)
        first += used
    everything = dataset.concatenate(sites)
    fractions = (1 - spec.val_fraction - spec.test_fraction, spec.val_fraction, spec.test_fraction)
    split_rng = np.random.default_rng([spec.seed, _SPLIT_STREAM])
    try:
        train, val, test = dataset.split_by_patient(everything, fractions, split_rng)
        splits = dataset.DatasetSplits(info=dataset_info(spec), train=train, val=val, test=test)
        return dataset.validate_splits(splits)
    except ValueError as e:
        raise ValueError(
            f"{e}; the spec is too small to fill every split, increase examples_per_site="
            f"{spec.examples_per_site} or num_sites={spec.num_sites}, or lower "
            f"images_per_patient={spec.images_per_patient}"
        ) from e


def cache_path(spec: SyntheticSpec, cache_dir: str) -> str:
    """The ``.npz`` file that caches ``spec``: keyed by a hash of every field and the version."""
    # depth = 0 (images) and masks = False are left out, so the 2-D classification benchmark
    # keeps the key it had before volumes and masks.
    defaults = {"depth": 0, "masks": False}
    fields = {
        k: repr(v)
        for k, v in dataclasses.asdict(spec).items()
        if not (k in defaults and v == defaults[k])
    }
    key = json.dumps({"version": GENERATOR_VERSION, **fields}, sort_keys=True).encode()
    return os.path.join(cache_dir, f"synthetic_{hashlib.sha256(key).hexdigest()[:20]}.npz")


def _to_arrays(splits: dataset.DatasetSplits) -> dict[str, np.ndarray]:
    arrays = {}
    for name in _SPLITS:
        d = splits.split(name)
        fields = dict(images=d.images, labels=d.labels, sites=d.sites, patient_ids=d.patient_ids)
        arrays.update({f"{name}.{k}": v for k, v in {**fields, **d.subgroups}.items()})
    return arrays


def _from_arrays(spec: SyntheticSpec, arrays) -> dataset.DatasetSplits:
    parts = {}
    for name in _SPLITS:
        fields = (*_FIELDS, "finding") if spec.masks else _FIELDS
        a = {field: np.asarray(arrays[f"{name}.{field}"]) for field in fields}
        parts[name] = dataset.ImageDataset(
            images=a["images"],
            labels=a["labels"],
            sites=a["sites"],
            patient_ids=a["patient_ids"],
            subgroups={k: a[k] for k in dataset_info(spec).subgroup_names},
        )
    return dataset.validate_splits(dataset.DatasetSplits(info=dataset_info(spec), **parts))


def _write_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes to a temporary file beside ``path`` then renames, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_synthetic(spec: SyntheticSpec, cache_dir: str | None) -> dataset.DatasetSplits:
    """Returns :func:`generate` ``(spec)``, read from or written to ``cache_dir`` when given.

    A cache file that cannot be read or fails validation is regenerated and overwritten.

    Args:
        spec: the benchmark to load.
        cache_dir: folder for the ``.npz`` cache (created if missing); ``None`` disables caching.

    Returns:
        The same splits as ``generate(spec)``.
    """
    validate_spec(spec)
    if cache_dir is None:
        return generate(spec)
    path = cache_path(spec, cache_dir)
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return _from_arrays(spec, arrays)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable or invalid: fall through and regenerate
    splits = generate(spec)
    os.makedirs(cache_dir, exist_ok=True)
    _write_atomic(path, _to_arrays(splits))
    return splits
