"""Differential privacy for training: DP-SGD and its accounting.

One module per step of DP-SGD (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133); import
the modules, e.g. ``from fedjax_med.privacy import clipping``:

* ``sampling``: Poisson (and fixed-size) batch samplers on the host, example or patient level.
* ``per_example``: per-example gradients of a single-example loss (``vmap(grad)``).
* ``clipping``: the sum of clipped per-example (or per-patient) gradients and its sensitivity;
  ``ghost`` is its fast path that never materialises per-example gradients.
* ``noise``: Gaussian noise on the clipped sum and division by the expected batch size, as an
  optax transformation; the noise key (reproducible or secure).
* ``accounting``: ``DpEvent`` of a run, its epsilon (RDP or PLD), noise calibration.
* ``budget``: the ledger that stops training at the target epsilon.
* ``cli``: the ``privacy epsilon`` / ``privacy calibrate`` commands.

A DP-SGD step: ``clipped_grad_sum`` on the sampled batch (all chunks), then
``dp_aggregate`` (noise with std ``sigma * C``, divide by ``q N``), then the optimizer; the same
``sigma``, ``q`` and step count go to ``accounting.dpsgd_event`` and ``budget.PrivacyLedger``.
"""
