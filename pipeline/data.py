"""The data every stage sees: a bundle of train / val / calibration splits, its loaders, and the
helpers every task's data sources share (seeded stratified shares, the development split, the
calibration subset, DataLoader worker counts, RGB conversion).

A task's data sources (``pipeline/tasks/<task>/``) build the bundle; the calibration split (INT8
calibration) is always a seeded subset of the *training* images seen through the *evaluation*
transform, never evaluation images.

:func:`resolve_workers` turns ``[data] num_workers`` into the training loaders' worker count:
a bundle says whether its items are already in memory (``DataBundle.in_memory``: digits, the
scene generator), where "auto" means none.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.errors import ConfigError
from pipeline.schema import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "calibration")


# --------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """The three splits of one dataset plus what models need to know about it.

    Every item is ``(float32 tensor 3×S×S normalised, target)``; the target's type is the
    task's (an int label for classification).
    """

    train: Dataset
    val: Dataset
    calibration: Dataset
    classes: list[str]
    image_size: int
    # Batches targets that are not plain tensors (detection boxes); None: torch's default.
    collate: Callable[[list], Any] | None = None
    # Items are cut from tensors already in memory (digits, scenes): a worker process would cost
    # more to start than it saves, so `[data] num_workers = "auto"` gives 0 (see `workers`).
    in_memory: bool = False

    @property
    def num_classes(self) -> int:
        """Number of classes (length of :attr:`classes`)."""
        return len(self.classes)

    def with_train_share(self, fraction: float, seed: int) -> "DataBundle":
        """This bundle with a seeded share of its training split (stratified by label where the
        labels are known); val and calibration unchanged. The same seed gives the same images."""
        if fraction >= 1.0:
            return self
        n = len(self.train)  # type: ignore[arg-type]
        labels = labels_of(self.train)
        keep = subset_positions(labels, n, fraction, seed)
        return replace(self, train=Subset(self.train, keep.tolist()))

    def with_dev_split(self, plain: "DataBundle", fraction: float, seed: int) -> "DataBundle":
        """This bundle with a seeded, stratified ``fraction`` of its training split held out as
        the split it evaluates on (the development split: choose recipes there, never on val).
        ``plain`` is the same data loaded without augmentation: the held-out images are seen as
        evaluation images are. Calibration draws from the rest of the training split."""
        n = len(self.train)  # type: ignore[arg-type]
        labels = labels_of(self.train)
        dev = subset_positions(labels, n, fraction, seed + 1)
        rest = np.setdiff1d(np.arange(n), dev)
        if not len(dev) or not len(rest):
            raise ConfigError(f"data.dev_fraction = {fraction}: the training split ({n} images) is too small to split")
        train = LabelledSubset(self.train, rest.tolist(), None if labels is None else labels[rest])
        calibration = Subset(plain.train, rest[calibration_positions(len(rest), len(self.calibration), seed)].tolist())
        return replace(self, train=train, val=Subset(plain.train, dev.tolist()), calibration=calibration)

    def workers(self, setting: int | str) -> int:
        """The DataLoader worker processes for ``[data] num_workers = setting`` (see :func:`resolve_workers`)."""
        return resolve_workers(setting, in_memory=self.in_memory)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Model input shape without the batch axis: ``(3, S, S)``."""
        return (3, self.image_size, self.image_size)

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool | None = None,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        sampler: Any = None,
    ) -> DataLoader:
        """A DataLoader over ``split`` (``train`` | ``val`` | ``calibration``).

        ``shuffle`` defaults to True for ``train`` only. The shuffling order (and the base seed
        of worker processes) comes from a ``torch.Generator`` seeded with ``seed``, so the same
        seed gives the same order. When ``sampler`` is given, ``shuffle`` is not passed.
        ``persistent_workers`` keeps the worker processes between epochs (only with workers).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        dataset = getattr(self, split)
        if shuffle is None:
            shuffle = split == "train"
        generator = torch.Generator()
        generator.manual_seed(seed)
        kwargs: dict[str, Any] = dict(
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            pin_memory=pin_memory,
            generator=generator,
            collate_fn=self.collate,
        )
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers  # DataLoader refuses it without workers
        if sampler is not None:
            kwargs["sampler"] = sampler  # DataLoader refuses shuffle together with a sampler
        else:
            kwargs["shuffle"] = shuffle
        return DataLoader(dataset, **kwargs)


# Most worker processes "auto" starts per loader (Ultralytics caps its default at 8; torchvision's
# references default to 16): each worker holds its own copy of the dataset's Python objects.
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a batch
    scheduler's cgroup), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(setting: int | str, *, in_memory: bool, cpus: int | None = None) -> int:
    """DataLoader worker processes per loader for ``[data] num_workers = setting``.

    A number is used as given. ``"auto"``: 0 for an in-memory source (digits, scenes: items are
    slices of tensors, cheaper than a worker's start-up), else
    ``min(MAX_AUTO_WORKERS, cpus // local_ranks - 1)``: the CPUs available to this process
    (``cpus``, default :func:`available_cpus`), shared by the ranks torchrun starts on this node
    (``LOCAL_WORLD_SIZE``), less one for the training process itself; so 0 on one core, 1 on
    two, 7 on eight, 8 from nine up.
    """
    if setting != "auto":
        return int(setting)
    if in_memory:
        return 0
    cpus = available_cpus() if cpus is None else cpus
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(MAX_AUTO_WORKERS, cpus // ranks - 1))


# --------------------------------------------------------------------------------------------
# Images and datasets
# --------------------------------------------------------------------------------------------


class ToRGB:
    """Convert a PIL image to RGB (grayscale datasets, palette PNGs, RGBA).

    A class rather than a lambda so DataLoader worker processes can pickle it.
    """

    def __call__(self, img: Any) -> Any:
        return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img

    def __repr__(self) -> str:
        return "ToRGB()"


def load_rgb(path: str) -> Any:
    """ImageFolder loader: open an image file and return it as RGB (module level: picklable).

    Grayscale, palette and RGBA images are converted, so a folder mixing them is fine. An
    unreadable file is a user error naming the file (exit code 2), not a traceback mid-epoch.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"data.root: cannot read image {path} ({type(exc).__name__}: {exc}); "
                          "remove or replace the file") from None


class TransformedDataset(Dataset):
    """Apply ``transform`` to the images of an untransformed dataset.

    Lets the training split and the calibration split share one scan of the training images
    while seeing them through different transforms.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[i]
        return self.transform(img), int(label)


# --------------------------------------------------------------------------------------------
# Splitting helpers
# --------------------------------------------------------------------------------------------


def subset_positions(labels: np.ndarray | None, n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a seeded subset holding ``fraction`` of ``n`` items.

    Stratified by label where that is possible (every class keeps its share), otherwise a
    seeded random subset (e.g. fewer kept items than classes).
    """
    if fraction >= 1.0:
        return np.arange(n)
    keep = max(1, int(round(fraction * n)))
    if keep >= n:
        return np.arange(n)
    if labels is not None:
        from sklearn.model_selection import train_test_split

        try:
            kept, _ = train_test_split(np.arange(n), train_size=keep, stratify=labels, random_state=seed)
            return np.sort(kept)
        except ValueError:
            pass  # too few items per class to stratify: fall back to a plain seeded subset
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[:keep])


class LabelledSubset(Subset):
    """A Subset that keeps its labels visible (``targets``), so a later share stays stratified."""

    def __init__(self, dataset: Dataset, indices: list[int], labels: np.ndarray | None):
        super().__init__(dataset, indices)
        if labels is not None:
            self.targets = labels.tolist()


def load_bundle(task: Any, cfg: DataConfig, seed: int, base_dir: Path) -> DataBundle:
    """The run's dataset: ``task.load_data``, with the development split carved out of the
    training split when ``[data] dev_fraction`` > 0."""
    bundle = task.load_data(cfg, seed, base_dir)
    if cfg.dev_fraction <= 0:
        return bundle
    plain = task.load_data(cfg.model_copy(update={"augment": False}), seed, base_dir) if cfg.augment else bundle
    dev = bundle.with_dev_split(plain, cfg.dev_fraction, seed)
    log.info("data: development split of %d training images replaces val (%d images) for evaluation; "
             "%d images left to train on", len(dev.val), len(bundle.val), len(dev.train))
    return dev


def calibration_positions(n_train: int, size: int, seed: int) -> np.ndarray:
    """Seeded positions into the training split for the calibration subset."""
    g = torch.Generator()
    g.manual_seed(seed)
    return np.sort(torch.randperm(n_train, generator=g)[: min(size, n_train)].numpy())


def labels_of(dataset: Any) -> np.ndarray | None:
    """Labels of a torchvision/ImageFolder dataset without decoding images (None if unknown)."""
    for attr in ("targets", "labels", "_labels", "y"):
        value = getattr(dataset, attr, None)
        if value is not None:
            try:
                arr = np.asarray(value if not torch.is_tensor(value) else value.numpy())
            except Exception:  # noqa: BLE001 - any odd container: treat as unknown
                continue
            if arr.ndim == 1 and len(arr) == len(dataset):
                return arr
    return None


def resolve_path(root: str, base_dir: Path, default: str = "") -> Path:
    """``root`` (or ``default``), relative to ``base_dir`` unless absolute."""
    p = Path(root or default).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p
