"""Fixed-shape batches for jitted steps: shuffled training batches and padded eval batches.

Shapes are static so a step compiles once: training batches have exactly ``batch_size`` examples
(each epoch drops its remainder) and evaluation batches are padded to ``batch_size`` with a mask.
Training batches are a pure function of ``(seed, step)``: batch ``s`` comes from the permutation
of epoch ``s // steps_per_epoch``, drawn from ``np.random.default_rng([seed, epoch])``, so a run
resumed at step ``s`` sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import preprocess


@dataclasses.dataclass(frozen=True)
class ShuffledBatches:
    """Epoch-wise shuffled fixed-size batches indexed by step (stateless, resumable).

    Examples:
        >>> batches = ShuffledBatches(num_examples=10, batch_size=4, seed=0)
        >>> batches.steps_per_epoch
        2
        >>> len(set(batches.indices(0)) | set(batches.indices(1)))
        8
    """

    num_examples: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size={self.batch_size} must be >= 1")
        if self.batch_size > self.num_examples:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be <= the number of training "
                f"examples ({self.num_examples})"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return order[position * self.batch_size : (position + 1) * self.batch_size]


def padded_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(indices, mask)`` covering ``range(num_examples)`` in fixed-size batches.

    The last batch is padded by repeating index 0 with ``mask=False``.

    Examples:
        >>> [(i.tolist(), m.tolist()) for i, m in padded_batches(3, 2)]
        [([0, 1], [True, True]), ([2, 0], [True, False])]
    """
    for start in range(0, num_examples, batch_size):
        idx = np.arange(start, min(start + batch_size, num_examples))
        mask = np.ones(batch_size, bool)
        if idx.size < batch_size:
            mask[idx.size :] = False
            idx = np.concatenate([idx, np.zeros(batch_size - idx.size, idx.dtype)])
        yield idx, mask


def gather(
    data: dataset_lib.ImageDataset, indices: np.ndarray, normalizer: preprocess.Normalizer
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float32 images and labels of the examples at ``indices``."""
    return normalizer(data.images[indices], data.sites[indices]), data.labels[indices]
