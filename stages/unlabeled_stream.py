"""The unlabelled batch drawn beside every labelled one (``[distill] unlabeled``).

Each optimizer step of a distilled student draws one labelled batch (task loss + distillation
terms) and one batch from this stream (distillation terms only). The stream must not disturb
what the student shares with its baseline (same labelled order, same augmentation draws), so:

- its order comes from a generator of its own, reseeded per epoch from the run's seed: a run
  resumed at an epoch boundary draws the same batches as one that never stopped;
- images are fetched with torch's global random state swapped for the stream's own (the
  in-memory sources augment with the global generator in the training process), so the
  labelled batches' augmentation is drawn exactly as for the baseline.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

_EPOCH_SEED = 1_000_003  # epochs get seeds far apart from the run's other seeds


class UnlabeledStream:
    """Batches of unlabelled images, ``batch_size`` each, cycling through ``dataset``."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, num_workers: int = 0,
                 pin_memory: bool = False):
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the unlabelled stream is empty")
        self.dataset, self.seed = dataset, seed
        self.batch_size = min(batch_size, len(dataset))  # type: ignore[arg-type]
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._epoch = -1
        self._it: Iterator[torch.Tensor] | None = None
        self._rng = torch.get_rng_state()

    def _loader(self, pass_seed: int) -> DataLoader:
        gen = torch.Generator()
        gen.manual_seed(pass_seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=gen,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=False)

    def start_epoch(self, epoch: int) -> None:
        """Restart the stream for ``epoch`` (0-based) from a seed of its own."""
        self._epoch, self._pass = epoch, 0
        self._rng = torch.Generator().manual_seed(self.seed * _EPOCH_SEED + epoch + 1).get_state()
        self._it = None

    def next(self) -> torch.Tensor:
        """The next batch (``batch_size``×3×S×S), the global random state untouched."""
        if self._epoch < 0:
            self.start_epoch(0)
        outside = torch.get_rng_state()
        torch.set_rng_state(self._rng)
        try:
            while True:
                if self._it is None:
                    pass_seed = (self.seed * _EPOCH_SEED + self._epoch + 1) * 7919 + self._pass
                    self._it, self._pass = iter(self._loader(pass_seed)), self._pass + 1
                batch = next(self._it, None)
                if batch is not None:
                    return batch
                self._it = None  # a pass is over: the next one reshuffles
        finally:
            self._rng = torch.get_rng_state()
            torch.set_rng_state(outside)
