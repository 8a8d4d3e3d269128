"""The randomness of a run: its named streams, and the two modes a privacy claim depends on.

Every random draw of the library comes from a named stream of this module, so no module writes a
literal stream number and no two purposes share a stream.

* Device draws (``jax.random``): ``fold_in(root, stream)`` of a root key; under a round key
  (``fold_in(server_key, round)``) the round streams; under a client's step key the step streams.
* Host draws (``np.random.Generator``): ``default_rng([seed, *stream, *index])``.

Two modes (``privacy.noise_seed`` in a config), and what a privacy claim means under each:

* ``"reproducible"``: every draw is a function of ``config.seed``, which ``config.json`` and
  ``report.json`` publish. A run can be replayed bit for bit and resumes exactly. It is a
  *simulation*: anyone who holds the seed can regenerate the batches, the cohorts and the noise
  and subtract it, so no differential-privacy guarantee holds against them.
* ``"secure"``: every draw a guarantee relies on (batch and cohort sampling, DP noise, local and
  distributed client noise, secure-aggregation keys and neighbour graphs) comes from the operating
  system's entropy, never from the seed, and no key that produced or will produce released noise
  is written to disk (Opacus' ``secure_mode`` follows the same rule). Host draws use ChaCha20
  (20 rounds, the stream cipher of RFC 8439, via ``randomgen``) keyed with 256 fresh bits from
  :mod:`secrets`; device keys use JAX's ``rbg`` implementation, whose key is 128 bits wide, all
  of them from :mod:`secrets`. A resumed secure run is exact in everything but those draws.

Known limitation: floating-point Gaussian samplers do not exactly realise the continuous Gaussian
mechanism (Mironov, CCS 2012); this library does not correct it.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import zlib

import jax
import numpy as np
import randomgen

MODES = ("reproducible", "secure")

# ---- device streams: fold_in(jax.random.key(seed), STREAM) -------------------------------------
PARAMS = 0  # model initialisation
STEPS = 1  # the central trainer's per-step key (non-private randomness)
SERVER = 2  # the federated server's root key; round t uses fold_in(server_key, t)
NOISE = zlib.crc32(b"noise")  # the DP-SGD noise key of the central trainer
# Augmentation multiplicity's views (public randomness): fold_in(fold_in(., step), example index)
AUGMULT = zlib.crc32(b"augmult")
# The noise of the private feature statistics (DataNorm) released before step 0.
DATA_NORM = zlib.crc32(b"data_norm")
PERSONALIZATION = 10_000_019  # under the server key: per-site fine-tuning after training

# ---- round streams: fold_in(round_key, STREAM) -------------------------------------------------
ROUND_CLIENTS = 0  # each client's local-training key: fold_in(fold_in(round_key, 0), k)
ROUND_DROPOUT = 1  # simulated client failures
ROUND_SERVER_NOISE = 2  # DP-FedAvg's server noise
ROUND_AGGREGATOR_NOISE = 3  # the weak-DP noise of norm-bounded aggregation (Sun et al. 2019)

# ---- local step streams: fold_in(step_key, STREAM) ---------------------------------------------
STEP_BATCH = 0  # which rows a local step samples
STEP_NOISE = 1  # the local DP-SGD noise of that step

# ---- client streams: fold_in(client_key, STREAM) -----------------------------------------------
# Ditto's personal-model steps; the global-model steps use jax.random.split(client_key, S).
CLIENT_PERSONAL = zlib.crc32(b"personal")

# ---- host streams: default_rng([seed, *STREAM, *index]) ----------------------------------------
BATCHES: tuple[int, ...] = ()  # DP-SGD batches of step t: default_rng([seed, t])
COHORTS: tuple[int, ...] = ()  # federated cohorts of round t: default_rng([seed, t])
PARTITION = (7,)  # how the training split becomes clients
CLIENT_NOISE = (7919,)  # distributed DP: client k's integer noise in round t
SECAGG_KEYS = (1,)  # simulated SecAgg key material (reproducible runs only)
SECAGG_GRAPH = (2,)  # SecAgg+ neighbour graph and the simulation's routing
ADDITIVE_SHARES = (3,)  # additive secret shares (reproducible runs only)
TUNE_TRIALS = (13,)  # fedjax-med tune: the number of trials and each trial's hyperparameters

# ---- attacks and audits (the attacker's own randomness, always from the seed) -------------------
REPORT_SHADOWS = 0  # fold_in(key(seed), .): the privacy report's LiRA shadow models
REPORT_INVERSION = 1  # ... its gradient-inversion restarts (then fold_in the setting's index)
REPORT_AUDIT = 2  # ... its canary audits (then fold_in the setting's index)
AUDIT_SPLIT = 1  # fold_in(audit_key, .): the random split that picks an audit's threshold
MEMBERSHIP_POOL = (1,)  # default_rng([seed, 1]): the LiRA pool and the shadows' halves
RUN_AUDIT_CANARIES = (2,)  # default_rng([seed, 2]): which canaries a one-run audit includes
INVERSION_BASELINE = 1  # PRNGKey(.): the random-image baseline of ``attack inversion``
POISONING = (11,)  # default_rng([seed, 11]): which clients are malicious, which images they poison


def check_mode(mode: str) -> str:
    """Returns ``mode`` if it is one of :data:`MODES`; raises naming the allowed values."""
    if mode not in MODES:
        raise ValueError(f"privacy.noise_seed={mode!r} must be one of {MODES}")
    return mode


def csprng() -> np.random.Generator:
    """A NumPy generator over ChaCha20 keyed with 256 bits of operating-system entropy.

    ChaCha20 (Bernstein 2008; RFC 8439) is a cryptographically secure stream cipher, so its
    outputs cannot be predicted from earlier outputs; PCG64, NumPy's default, can be.

    Examples:
      >>> a, b = csprng(), csprng()
      >>> bool(a.random() != b.random())
      True
    """
    return np.random.Generator(randomgen.ChaCha(key=secrets.randbits(256), rounds=20))


def secure_key() -> jax.Array:
    """A JAX key whose 128 bits all come from :mod:`secrets` (``rbg`` implementation).

    Examples:
      >>> int(jax.random.key_data(secure_key()).size) * 32
      128
    """
    words = jax.random.key_data(jax.random.key(0, impl="rbg")).shape
    data = np.array([secrets.randbits(32) for _ in range(math.prod(words))], np.uint32)
    return jax.random.wrap_key_data(data.reshape(words), impl="rbg")


def key_entropy_bits(key: jax.Array) -> int:
    """Width of a JAX key in bits (the most entropy it can carry)."""
    return int(jax.random.key_data(key).size) * 32


@dataclasses.dataclass(frozen=True)
class Randomness:
    """Where a run's privacy-relevant randomness comes from.

    Attributes:
      mode: ``"reproducible"`` (a function of ``seed``) or ``"secure"`` (operating-system
        entropy; ``seed`` is never read).
      seed: the run's integer seed.

    Examples:
      >>> r = Randomness("reproducible", 3)
      >>> bool(r.generator(BATCHES, 5).random() == Randomness("reproducible", 3)
      ...      .generator(BATCHES, 5).random())
      True
      >>> Randomness("secure", 3).persistable
      False
    """

    mode: str
    seed: int = 0

    def __post_init__(self):
        check_mode(self.mode)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed={self.seed!r} must be an integer")

    @property
    def secure(self) -> bool:
        return self.mode == "secure"

    @property
    def persistable(self) -> bool:
        """Whether keys of this mode may be written to checkpoints (only reproducible ones)."""
        return not self.secure

    def generator(self, stream: tuple[int, ...], *index: int) -> np.random.Generator:
        """The host generator of ``stream`` at ``index`` (a fresh CSPRNG in secure mode)."""
        if self.secure:
            return csprng()
        return np.random.default_rng([int(self.seed), *stream, *(int(i) for i in index)])

    def key(self, stream: int) -> jax.Array:
        """The device key of ``stream``: ``fold_in(key(seed), stream)``, or a fresh secret key."""
        if self.secure:
            return secure_key()
        return jax.random.fold_in(jax.random.key(int(self.seed)), stream)

    def describe(self) -> str:
        """What the mode means for a privacy claim, in one sentence (for reports)."""
        if self.secure:
            return (
                "secure: sampling, noise and secure-aggregation randomness come from the "
                "operating system's entropy (ChaCha20 / 128-bit JAX keys) and are never "
                "written to disk"
            )
        return (
            "reproducible: a simulation; every draw follows from the published seed, so no "
            "guarantee holds against anyone who holds the seed"
        )
