"""Training data: the resumable, process-sharded sampler and the endless batch stream over epochs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded shuffle per epoch, sharded over processes (equal shares), resumable mid-epoch.

    Epoch ``e`` uses ``randperm(n, seed + e)``; process ``r`` of ``w`` takes positions ``r, r + w, ...`` of
    the first ``(n // w) * w``. ``set_position(epoch, start)`` skips the first ``start`` indices.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.num_samples, self.seed, self.rank, self.world_size, self.shuffle = (
            num_samples,
            seed,
            rank,
            world_size,
            shuffle,
        )
        self.per_rank = num_samples // world_size
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def _collate_fn() -> Callable[[list[dict]], dict]:
    try:
        from ..data.latents import collate_latents
    except ImportError:
        from torch.utils.data import default_collate

        return default_collate
    return collate_latents


class _DataStream:
    """Endless batches over epochs; its position (epoch, batch in epoch) is saved and restored."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int,
        world: int,
        pin_memory: bool,
    ) -> None:
        self.dataset, self.batch_size, self.num_workers, self.pin_memory = (
            dataset,
            batch_size,
            num_workers,
            pin_memory,
        )
        self.sampler = ResumableSampler(len(dataset), seed, rank, world)
        self.batches_per_epoch = self.sampler.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset too small: {len(dataset)} clips cannot fill one batch of {batch_size} on each of "
                f"{world} process(es)"
            )
        self.seed = seed
        self.collate = _collate_fn()
        self.epoch, self.batch = 0, 0
        self._iter: Iterator[dict] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._iter = int(state["epoch"]), int(state["batch_in_epoch"]), None
        if self.batch > self.batches_per_epoch:
            raise ValueError(
                f"saved data position {self.batch} is past the epoch ({self.batches_per_epoch} batches)"
            )

    def next(self) -> dict:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._iter = self.epoch + 1, 0, None
        if self._iter is None:
            self.sampler.set_position(self.epoch, self.batch * self.batch_size)
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self.sampler,
                drop_last=True,
                collate_fn=self.collate,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                # its own generator: creating an iterator must not draw from the global RNG
                generator=torch.Generator().manual_seed(self.seed + self.epoch),
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        self.batch += 1
        return batch


def open_dataset(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """The latent cache at ``path`` (``egolcd.data.latents.LatentDataset``, imported lazily; ``kwargs``:
    its windowing options)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"latent cache not found: {path}")
    from ..data.latents import LatentDataset

    return LatentDataset(path, **kwargs)
