"""Split one dataset into the clients of a simulated federation, patient by patient.

A patient belongs to one hospital, so every partitioner here moves whole patients: a *unit* is a
``(site, patient_id)`` pair and all its images go to the same client. Pairing the patient with
the site keeps two patients apart when different sites reuse the same local identifier. A unit's
label is the label of its first image; for multilabel data it is the index of the first positive
label of that image, or 0 when none is positive (``argmax`` of the 0/1 vector).

Methods (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", https://arxiv.org/abs/1602.05629, introduced the IID and non-IID client
setups these simulate):

* ``"by_site"``: the natural split, one client per hospital.
* ``"iid"``: units shuffled and dealt evenly.
* ``"dirichlet"``: label skew controlled by a Dirichlet concentration ``alpha``
  (Hsu, Qi, Brown 2019, https://arxiv.org/abs/1909.06335).
* ``"quantity_skew"``: client sizes drawn from a Dirichlet with concentration ``beta``, labels
  IID (Li, Diao, Chen, He 2022, https://arxiv.org/abs/2102.02079).

Partitioners return sorted example indices per client; :func:`make_federated` stacks them into a
padded :class:`FederatedDataset` with fixed shapes, so a vmapped client step compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fedjax_med.data import dataset as dataset_lib

METHODS = ("by_site", "iid", "dirichlet", "quantity_skew")


def iid(
    dataset: dataset_lib.ImageDataset, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffles the patients and deals them evenly (client sizes in units differ by <= 1).

    Args:
      dataset: the examples to split.
      num_clients: number of clients, in ``[1, number of patients]``.
      rng: host random generator.

    Returns:
      Sorted example indices of each client.
    """
    unit_of_example, unit_labels = _units(dataset)
    num_units = unit_labels.size
    _check_num_clients(num_clients, num_units)
    client_of_unit = np.empty(num_units, dtype=np.int64)
    for k, units in enumerate(np.array_split(rng.permutation(num_units), num_clients)):
        client_of_unit[units] = k
    return _client_examples(unit_of_example, client_of_unit, num_clients)


def dirichlet_label_skew(
    dataset: dataset_lib.ImageDataset,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_examples: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is spread over the clients in Dirichlet-distributed proportions.

    For every class ``c`` draw ``p_c ~ Dir(alpha * 1_K)`` over the ``K`` clients, shuffle the
    units of class ``c`` and give client ``k`` a ``p_{c,k}`` share of them (cut at
    ``floor(n_c * cumsum(p_c))``). Small ``alpha`` concentrates each class on a few clients, so
    client label distributions drift away from the global one; ``alpha -> inf`` approaches IID.
    This per-class form of Dirichlet label skew (Hsu, Qi, Brown 2019, arXiv:1909.06335) is the
    one of Yurochkin et al. 2019 (arXiv:1905.12022). The draw is repeated until every client
    holds at least ``min_examples`` examples.

    Args:
      dataset: the examples to split.
      num_clients: number of clients, in ``[1, number of patients]``.
      alpha: Dirichlet concentration, > 0.
      rng: host random generator.
      min_examples: fewest examples a client may hold.
      max_retries: draws to try before giving up with a ``ValueError``.

    Returns:
      Sorted example indices of each client.
    """
    if not alpha > 0:
        raise ValueError(f"{alpha=} must be > 0")
    unit_of_example, unit_labels = _units(dataset)
    num_units = unit_labels.size
    _check_num_clients(num_clients, num_units)
    unit_sizes = np.bincount(unit_of_example, minlength=num_units)
    classes = np.unique(unit_labels)
    for _ in range(max_retries):
        client_of_unit = np.empty(num_units, dtype=np.int64)
        for c in classes:
            units = rng.permutation(np.flatnonzero(unit_labels == c))
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            _assign_by_proportions(client_of_unit, units, proportions)
        if _min_client_size(client_of_unit, unit_sizes, num_clients) >= min_examples:
            return _client_examples(unit_of_example, client_of_unit, num_clients)
    raise ValueError(
        f"dirichlet_label_skew: no draw in {max_retries=} gave every one of {num_clients=} "
        f"clients >= {min_examples=} examples (alpha={alpha}, {num_units} patients); "
        "use a larger alpha or fewer clients"
    )


def quantity_skew(
    dataset: dataset_lib.ImageDataset,
    num_clients: int,
    rng: np.random.Generator,
    *,
    beta: float = 0.5,
    min_examples: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Quantity skew: client sizes ``q ~ Dir(beta * 1_K)``, labels IID.

    The units are shuffled and client ``k`` receives a ``q_k`` share of them (cut at
    ``floor(num_units * cumsum(q))``), as in the quantity-skew setting of Li et al. 2022
    (arXiv:2102.02079). Small ``beta`` gives a few large clients and many small ones. The draw is
    repeated until every client holds at least ``min_examples`` examples.

    Args:
      dataset: the examples to split.
      num_clients: number of clients, in ``[1, number of patients]``.
      rng: host random generator.
      beta: Dirichlet concentration, > 0.
      min_examples: fewest examples a client may hold.
      max_retries: draws to try before giving up with a ``ValueError``.

    Returns:
      Sorted example indices of each client.
    """
    if not beta > 0:
        raise ValueError(f"{beta=} must be > 0")
    unit_of_example, unit_labels = _units(dataset)
    num_units = unit_labels.size
    _check_num_clients(num_clients, num_units)
    unit_sizes = np.bincount(unit_of_example, minlength=num_units)
    for _ in range(max_retries):
        client_of_unit = np.empty(num_units, dtype=np.int64)
        proportions = rng.dirichlet(np.full(num_clients, float(beta)))
        _assign_by_proportions(client_of_unit, rng.permutation(num_units), proportions)
        if _min_client_size(client_of_unit, unit_sizes, num_clients) >= min_examples:
            return _client_examples(unit_of_example, client_of_unit, num_clients)
    raise ValueError(
        f"quantity_skew: no draw in {max_retries=} gave every one of {num_clients=} clients "
        f">= {min_examples=} examples (beta={beta}, {num_units} patients); "
        "use a larger beta or fewer clients"
    )


def by_site(
    dataset: dataset_lib.ImageDataset, site_names: Sequence[str]
) -> tuple[list[np.ndarray], list[str]]:
    """The natural split: client ``s`` holds the examples whose ``sites`` code is ``s``.

    Args:
      dataset: the examples to split.
      site_names: the name of each site code (``DatasetInfo.site_names``).

    Returns:
      ``(indices, names)``: sorted example indices per site and the site names.

    Raises:
      ValueError: a site has no examples, or a code lies outside ``[0, len(site_names))``.
    """
    sites = np.asarray(dataset.sites)
    if len(dataset) and (sites.min() < 0 or sites.max() >= len(site_names)):
        raise ValueError(
            f"sites must lie in [0, {len(site_names)}) (one per site name), found range "
            f"[{sites.min()}, {sites.max()}]"
        )
    indices = []
    for code, name in enumerate(site_names):
        idx = np.flatnonzero(sites == code)
        if idx.size == 0:
            raise ValueError(f"site {name!r} (code {code}) has no examples; a client needs >= 1")
        indices.append(idx)
    return indices, list(site_names)


def partition(
    dataset: dataset_lib.ImageDataset,
    method: str,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    site_names: Sequence[str] | None = None,
) -> tuple[list[np.ndarray], list[str]]:
    """Splits ``dataset`` into clients with the named method.

    Args:
      dataset: the examples to split.
      method: one of ``"by_site"``, ``"iid"``, ``"dirichlet"``, ``"quantity_skew"``.
      num_clients: number of clients. For ``"by_site"`` it must equal the number of sites.
      rng: host random generator (unused by ``"by_site"``).
      alpha: Dirichlet concentration of ``"dirichlet"``.
      beta: Dirichlet concentration of ``"quantity_skew"``.
      site_names: site names for ``"by_site"``; defaults to ``site_0, site_1, ...`` up to the
        largest site code.

    Returns:
      ``(indices, names)``: sorted example indices per client and the client names (the site
      names for ``"by_site"``, otherwise ``client_0, client_1, ...``).

    Examples:
      >>> import numpy as np
      >>> from fedjax_med.data import dataset as dataset_lib
      >>> data = dataset_lib.ImageDataset(
      ...     images=np.zeros((6, 2, 2, 1), np.uint8),
      ...     labels=np.array([0, 1, 0, 1, 0, 1], np.int32),
      ...     sites=np.array([0, 0, 0, 1, 1, 1]),
      ...     patient_ids=np.array([0, 0, 1, 2, 3, 4]),
      ... )
      >>> indices, names = partition(data, "by_site", 2, np.random.default_rng(0),
      ...                            site_names=["north", "south"])
      >>> names, [i.tolist() for i in indices]
      (['north', 'south'], [[0, 1, 2], [3, 4, 5]])
      >>> indices, names = partition(data, "iid", 2, np.random.default_rng(0))
      >>> names, sorted(np.concatenate(indices).tolist())
      (['client_0', 'client_1'], [0, 1, 2, 3, 4, 5])
    """
    if method == "by_site":
        if site_names is None:
            site_names = [f"site_{s}" for s in range(int(np.max(dataset.sites)) + 1)]
        if num_clients != len(site_names):
            raise ValueError(
                f"{num_clients=} must equal the number of sites ({len(site_names)}) for "
                "method='by_site'"
            )
        return by_site(dataset, site_names)
    if method == "iid":
        indices = iid(dataset, num_clients, rng)
    elif method == "dirichlet":
        indices = dirichlet_label_skew(dataset, num_clients, alpha, rng)
    elif method == "quantity_skew":
        indices = quantity_skew(dataset, num_clients, rng, beta=beta)
    else:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    return indices, [f"client_{k}" for k in range(num_clients)]


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedDataset:
    """Clients' data stacked along a leading client axis and padded to a common length.

    With ``K`` clients and ``M`` the padded length (the largest client by default), row
    ``[k, j]`` is example ``example_index[k, j]`` of ``centralized`` when ``mask[k, j]`` is true
    and a zero row otherwise. Client ``k``'s real rows come first: ``mask[k, :counts[k]]`` is all
    true.
    """

    images: np.ndarray  # (K, M, H, W, C)
    labels: np.ndarray  # (K, M) or (K, M, L)
    mask: np.ndarray  # (K, M) bool, true for real examples
    counts: np.ndarray  # (K,) int32
    example_index: np.ndarray  # (K, M) int64 index into `centralized`, -1 for padding
    client_names: tuple[str, ...]
    centralized: dataset_lib.ImageDataset  # the same examples as one dataset, client by client

    @property
    def num_clients(self) -> int:
        return len(self.client_names)

    def client(self, k: int) -> dataset_lib.ImageDataset:
        """The unpadded examples of client ``k``, with their metadata."""
        if not 0 <= k < self.num_clients:
            raise ValueError(f"client index {k=} must lie in [0, {self.num_clients})")
        return self.centralized.take(self.example_index[k, : self.counts[k]])


def make_federated(
    dataset: dataset_lib.ImageDataset,
    client_indices: Sequence[np.ndarray],
    client_names: Sequence[str],
    *,
    pad_to: int | None = None,
) -> FederatedDataset:
    """Stacks each client's examples into padded ``(K, M, ...)`` arrays with a mask.

    Args:
      dataset: the examples the indices refer to.
      client_indices: example indices of each client (e.g. from :func:`partition`); disjoint and
        non-empty. They need not cover the whole dataset.
      client_names: one name per client.
      pad_to: padded length ``M``; defaults to the largest client size.

    Returns:
      The :class:`FederatedDataset`. Its ``centralized`` dataset holds the clients' examples in
      client order, so index ``example_index[k, j]`` refers to it.
    """
    if len(client_indices) == 0:
        raise ValueError("client_indices is empty; a federation needs >= 1 client")
    if len(client_names) != len(client_indices):
        raise ValueError(
            f"len(client_names)={len(client_names)} must equal "
            f"len(client_indices)={len(client_indices)}"
        )
    n = len(dataset)
    indices = []
    for name, idx in zip(client_names, client_indices, strict=True):
        idx = np.asarray(idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices of client {name!r} must be a 1-D integer array")
        if idx.size == 0:
            raise ValueError(f"client {name!r} has no examples; every client needs >= 1")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"indices of client {name!r} must lie in [0, {n})")
        indices.append(idx.astype(np.int64))
    flat = np.concatenate(indices)
    if np.unique(flat).size != flat.size:
        raise ValueError("client_indices overlap: an example is assigned more than once")
    counts = np.array([idx.size for idx in indices], dtype=np.int32)
    largest = int(counts.max())
    if pad_to is None:
        pad_to = largest
    if pad_to < largest:
        raise ValueError(f"{pad_to=} must be >= the largest client size ({largest})")

    centralized = dataset.take(flat)
    num_clients = len(indices)
    rows = np.arange(pad_to)
    mask = rows[None, :] < counts[:, None]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    example_index = np.where(mask, offsets[:, None] + rows[None, :], -1)

    def pad(values: np.ndarray) -> np.ndarray:
        # Padding rows stay zero so they contribute nothing even before masking.
        out = np.zeros((num_clients, pad_to) + values.shape[1:], dtype=values.dtype)
        out[mask] = values
        return out

    return FederatedDataset(
        images=pad(centralized.images),
        labels=pad(centralized.labels),
        mask=mask,
        counts=counts,
        example_index=example_index,
        client_names=tuple(client_names),
        centralized=centralized,
    )


def _units(dataset: dataset_lib.ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Unit (site, patient) of each example and the label of each unit's first image (of a mask,
    its largest class)."""
    if len(dataset) == 0:
        raise ValueError("dataset is empty; there is nothing to partition")
    _, patient_code = np.unique(np.asarray(dataset.patient_ids), return_inverse=True)
    patient_code = patient_code.reshape(-1).astype(np.int64)
    key = np.asarray(dataset.sites).astype(np.int64) * (int(patient_code.max()) + 1) + patient_code
    _, first, unit_of_example = np.unique(key, return_index=True, return_inverse=True)
    first_labels = np.asarray(dataset.labels)[first]
    if first_labels.ndim == 2:
        first_labels = np.argmax(first_labels, axis=1)
    elif first_labels.ndim > 2:  # segmentation masks: the largest class present (0: background)
        first_labels = first_labels.reshape(len(first), -1).max(axis=1)
    return unit_of_example.reshape(-1), first_labels.astype(np.int64)


def _check_num_clients(num_clients: int, num_units: int) -> None:
    if not 1 <= num_clients <= num_units:
        raise ValueError(
            f"{num_clients=} must lie in [1, {num_units}] (the number of patients, since a "
            "patient is never split across clients)"
        )


def _assign_by_proportions(
    client_of_unit: np.ndarray, units: np.ndarray, proportions: np.ndarray
) -> None:
    """Gives client ``k`` the ``proportions[k]`` share of ``units``, in order (in place)."""
    cuts = np.floor(np.cumsum(proportions)[:-1] * units.size).astype(np.int64)
    for k, part in enumerate(np.split(units, cuts)):
        client_of_unit[part] = k


def _min_client_size(client_of_unit: np.ndarray, unit_sizes: np.ndarray, num_clients: int) -> int:
    return int(np.bincount(client_of_unit, weights=unit_sizes, minlength=num_clients).min())


def _client_examples(
    unit_of_example: np.ndarray, client_of_unit: np.ndarray, num_clients: int
) -> list[np.ndarray]:
    client_of_example = client_of_unit[unit_of_example]
    return [np.flatnonzero(client_of_example == k) for k in range(num_clients)]
