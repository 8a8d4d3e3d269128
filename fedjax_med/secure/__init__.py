"""Secure aggregation: the server learns only the sum of client vectors.

Host-side NumPy code, one module per layer; import the modules, e.g.
``from fedjax_med.secure import secagg``:

* ``field``: fixed-point encoding of clipped float vectors into the ring Z_(2^k) so that the sum
  of n encodings cannot wrap; modular add/sub on uint64.
* ``crypto``: X25519 + HKDF-SHA256 shared seeds, the AES-CTR mask PRG, AES-GCM for shares.
* ``shamir``: t-of-n Shamir sharing over GF(2^127 - 1) with a hash commitment of the secret.
* ``secagg``: the four SecAgg rounds (Bonawitz et al., CCS 2017, https://eprint.iacr.org/2017/281)
  as message dataclasses, a ``Server`` and ``Client``, the SecAgg+ parameters and secret random
  k-regular graph (Bell et al., CCS 2020, https://eprint.iacr.org/2020/704), ``secure_sum`` and
  the ``SecureSumStats`` every backend returns.
* ``additive``: additive secret sharing among S non-colluding aggregation servers, same
  ``secure_sum`` signature and stats.
* ``distributed_dp``: client-side integer noise (discrete Gaussian, Skellam) and the frozen
  ``DistributedDP`` record of a run's distributed-DP claim.
"""
