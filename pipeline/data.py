"""Datasets for every stage: train / val / calibration splits from one `[data]` table.

Three classification sources:

- ``digits``: scikit-learn's 1,797 handwritten 8×8 digits, shipped inside scikit-learn (no
  download), resized once to ``image_size`` and kept in memory as tensors.
- ``imagefolder``: a user's tree ``root/train/<class>/*`` and ``root/val/<class>/*``.
- ``torchvision``: a ``torchvision.datasets`` class by name (CIFAR10, MNIST, ...).

The calibration split (INT8 calibration) is always a seeded subset of the *training* images
seen through the *evaluation* transform, never evaluation images. :func:`eval_transform` is the
one preprocessing used for val, calibration, export and runtime evaluation.

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
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "calibration")

# Datasets of characters/digits: a horizontal flip turns them into other (or no) symbols,
# so flip augmentation would teach the model wrong labels.
_NO_FLIP_DATASETS = frozenset({"MNIST", "EMNIST", "KMNIST", "QMNIST", "SVHN", "USPS", "SEMEION", "Omniglot"})


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
        labels = _labels_of(self.train)
        keep = _subset_positions(labels, n, fraction, seed)
        return replace(self, train=Subset(self.train, keep.tolist()))

    def with_dev_split(self, plain: "DataBundle", fraction: float, seed: int) -> "DataBundle":
        """This bundle with a seeded, stratified ``fraction`` of its training split held out as
        the split it evaluates on (the development split: choose recipes there, never on val).
        ``plain`` is the same data loaded without augmentation: the held-out images are seen as
        evaluation images are. Calibration draws from the rest of the training split."""
        n = len(self.train)  # type: ignore[arg-type]
        labels = _labels_of(self.train)
        dev = _subset_positions(labels, n, fraction, seed + 1)
        rest = np.setdiff1d(np.arange(n), dev)
        if not len(dev) or not len(rest):
            raise ConfigError(f"data.dev_fraction = {fraction}: the training split ({n} images) is too small to split")
        train = _LabelledSubset(self.train, rest.tolist(), None if labels is None else labels[rest])
        calibration = Subset(plain.train, rest[_calibration_positions(len(rest), len(self.calibration), seed)].tolist())
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
# Transforms
# --------------------------------------------------------------------------------------------


class ToRGB:
    """Convert a PIL image to RGB (grayscale datasets, palette PNGs, RGBA).

    A class rather than a lambda so DataLoader worker processes can pickle it.
    """

    def __call__(self, img: Any) -> Any:
        return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img

    def __repr__(self) -> str:
        return "ToRGB()"


def _load_rgb(path: str) -> Any:
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


def _flip_ok(cfg: DataConfig) -> bool:
    return cfg.source != "digits" and not (cfg.source == "torchvision" and cfg.name in _NO_FLIP_DATASETS)


def eval_transform(cfg: DataConfig) -> Callable[[Any], torch.Tensor]:
    """The evaluation transform: PIL image -> normalised float tensor ``3×S×S``.

    ``S ≥ 64``: Resize(int(S/0.875)) + CenterCrop(S) (the ImageNet recipe); smaller inputs are
    resized straight to ``(S, S)`` because a centre crop would cut off too much of a tiny image.
    Digits are never cropped (a crop would cut strokes), so they always use Resize((S, S)).
    """
    from torchvision import transforms as T

    s = cfg.image_size
    if s >= 64 and cfg.source != "digits":
        geometry = [T.Resize(int(s / 0.875)), T.CenterCrop(s)]
    else:
        geometry = [T.Resize((s, s))]
    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def train_transform(cfg: DataConfig) -> Callable[[Any], torch.Tensor]:
    """The training transform: PIL image -> normalised float tensor ``3×S×S``.

    With ``augment``: RandomResizedCrop(S) + horizontal flip for ``S ≥ 64``, else
    Resize((S, S)) + RandomCrop(S, padding=S//8) + flip. No flips for digit/character datasets.
    Without ``augment`` this is :func:`eval_transform`. The in-memory ``digits`` source applies
    the tensor equivalent (random translation) itself; this PIL version is for its images on disk.
    """
    from torchvision import transforms as T

    if not cfg.augment:
        return eval_transform(cfg)
    s = cfg.image_size
    flip = [T.RandomHorizontalFlip()] if _flip_ok(cfg) else []
    if s >= 64 and cfg.source != "digits":
        geometry = [T.RandomResizedCrop(s)]
    else:
        geometry = [T.Resize((s, s)), T.RandomCrop(s, padding=max(s // 8, 1))]
    return T.Compose([ToRGB(), *geometry, *flip, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


# --------------------------------------------------------------------------------------------
# Dataset wrappers
# --------------------------------------------------------------------------------------------


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


class DigitsDataset(Dataset):
    """In-memory digits: a view (``indices``) into one shared tensor of resized images.

    Images are stored once as a single channel in [0, 1] (3× less memory than RGB; at 224 px
    the full set would otherwise take over 1 GB) and repeated / normalised per item, which is
    cheap compared with the model step.
    """

    def __init__(
        self,
        images: torch.Tensor,  # (N, 1, S, S) in [0, 1], shared by every split
        labels: torch.Tensor,  # (N,) int64
        indices: np.ndarray,  # positions in `images` that make up this split
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        shift: int = 0,  # max random translation in pixels (0: none)
    ):
        self.images = images
        self.labels = labels
        self.indices = np.asarray(indices, dtype=np.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.shift = shift

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> list[int]:
        """Labels of this split, in item order."""
        return self.labels[torch.from_numpy(self.indices)].tolist()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        x = self.images[j]  # (1, S, S)
        if self.shift:
            # Random crop of the zero-padded image = a random translation; 0 is the digits'
            # background, so padding before normalising adds no artificial border.
            p = self.shift
            s = x.shape[-1]
            padded = F.pad(x, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[:, top : top + s, left : left + s]
        x = (x.expand(3, -1, -1) - self.mean) / self.std
        return x, int(self.labels[j])


# --------------------------------------------------------------------------------------------
# Splitting helpers
# --------------------------------------------------------------------------------------------


def _subset_positions(labels: np.ndarray | None, n: int, fraction: float, seed: int) -> np.ndarray:
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


class _LabelledSubset(Subset):
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


def _calibration_positions(n_train: int, size: int, seed: int) -> np.ndarray:
    """Seeded positions into the training split for the calibration subset."""
    g = torch.Generator()
    g.manual_seed(seed)
    return np.sort(torch.randperm(n_train, generator=g)[: min(size, n_train)].numpy())


def _labels_of(dataset: Any) -> np.ndarray | None:
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


def _resolve(root: str, base_dir: Path, default: str = "") -> Path:
    p = Path(root or default).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _load_digits(cfg: DataConfig, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    s = cfg.image_size
    raw = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    # Resize once for the whole set: per-item resizing would dominate a tiny model's step.
    images = F.interpolate(raw, size=(s, s), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    y = digits.target

    train_idx, val_idx = train_test_split(
        np.arange(len(y)), test_size=cfg.val_fraction, stratify=y, random_state=seed
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    # train_fraction shrinks train only, after the val split, so val is the same for all fractions.
    train_idx = train_idx[_subset_positions(y[train_idx], len(train_idx), cfg.train_fraction, seed)]
    calib_idx = train_idx[_calibration_positions(len(train_idx), cfg.calibration_size, seed)]

    shift = max(s // 8, 1) if cfg.augment else 0
    train = DigitsDataset(images, labels, train_idx, cfg.mean, cfg.std, shift=shift)
    val = DigitsDataset(images, labels, val_idx, cfg.mean, cfg.std)
    calibration = DigitsDataset(images, labels, calib_idx, cfg.mean, cfg.std)
    classes = [str(c) for c in digits.target_names]
    return DataBundle(train=train, val=val, calibration=calibration, classes=classes, image_size=s, in_memory=True)


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------


def _has_image(folder: Path) -> bool:
    """True if ``folder`` holds at least one image file (recursively, like ImageFolder); stops early."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for _dirpath, _dirs, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def _check_imagefolder_split(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise ConfigError(
            f"data.root = '{root}': missing {split}/ folder; expected {root}/{split}/<class>/<image files>"
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"data.root = '{root}': {split}/ has no class folders; expected {root}/{split}/<class>/<image files>"
        )
    empty = [c for c in classes if not _has_image(folder / c)]
    if empty:
        raise ConfigError(
            f"data.root = '{root}': {split}/ class folders with no images: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}; add images (.png, .jpg, ...) or remove the folders"
        )
    return classes


def _check_imagefolder(cfg: DataConfig, base_dir: Path) -> tuple[Path, list[str]]:
    root = _resolve(cfg.root, base_dir)
    if not root.is_dir():
        raise ConfigError(
            f"data.root = '{cfg.root}': directory {root} does not exist; "
            "point it at a folder with train/<class>/ and val/<class>/ subfolders"
        )
    train_classes = _check_imagefolder_split(root, "train")
    val_classes = _check_imagefolder_split(root, "val")
    if len(train_classes) < 2:
        raise ConfigError(
            f"data.root = '{root}': train/ has {len(train_classes)} class folder ({', '.join(train_classes)}); "
            "classification needs at least 2"
        )
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        parts = []
        if only_train:
            parts.append(f"only in train/: {', '.join(only_train)}")
        if only_val:
            parts.append(f"only in val/: {', '.join(only_val)}")
        raise ConfigError(
            f"data.root = '{root}': train/ and val/ class folders differ ({'; '.join(parts)}); "
            "both need the same class folders"
        )
    return root, train_classes


def _load_imagefolder(cfg: DataConfig, base_dir: Path) -> tuple[Dataset, Dataset, list[str], np.ndarray | None]:
    from torchvision.datasets import ImageFolder

    root, classes = _check_imagefolder(cfg, base_dir)
    train_raw = ImageFolder(str(root / "train"), loader=_load_rgb)
    val = ImageFolder(str(root / "val"), transform=eval_transform(cfg), loader=_load_rgb)
    return train_raw, val, classes, _labels_of(train_raw)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def check_data(cfg: DataConfig, base_dir: Path = Path(".")) -> None:
    """Cheap preflight of ``[data]``: paths, folders, class sets, dataset name; decodes no images.

    Raises :class:`ConfigError` (one line naming the key and what to do) so the runner can stop
    before any stage starts. :func:`load_data` repeats these checks.
    """
    if cfg.source == "imagefolder":
        _check_imagefolder(cfg, Path(base_dir))
    elif cfg.source == "torchvision":
        from pipeline.torchvision_data import check_torchvision

        check_torchvision(cfg, Path(base_dir))
    # digits ships inside scikit-learn: nothing to check


def load_data(cfg: DataConfig, seed: int, base_dir: Path = Path(".")) -> DataBundle:
    """Build the train / val / calibration splits described by ``cfg``.

    ``seed`` fixes the digits train/val split, the ``train_fraction`` subset and the
    calibration subset. ``cfg.root`` is resolved against ``base_dir`` when relative.
    Raises :class:`ConfigError` for a user mistake (missing folders, unknown dataset, ...).
    """
    base_dir = Path(base_dir)
    if cfg.source == "digits":
        bundle = _load_digits(cfg, seed)
    else:
        if cfg.source == "imagefolder":
            train_raw, val, classes, labels = _load_imagefolder(cfg, base_dir)
        else:
            from pipeline.torchvision_data import load_torchvision

            train_raw, val, classes, labels = load_torchvision(cfg, base_dir)
        if len(classes) < 2:
            raise ConfigError(f"data: the dataset has {len(classes)} class; classification needs at least 2")
        keep = _subset_positions(labels, len(train_raw), cfg.train_fraction, seed)  # type: ignore[arg-type]
        train_src: Dataset = train_raw if len(keep) == len(train_raw) else Subset(train_raw, keep.tolist())  # type: ignore[arg-type]
        # One scan of the training images, two views: augmented for training, eval for calibration.
        train = TransformedDataset(train_src, train_transform(cfg))
        calib_pos = _calibration_positions(len(train_src), cfg.calibration_size, seed)  # type: ignore[arg-type]
        calibration = Subset(TransformedDataset(train_src, eval_transform(cfg)), calib_pos.tolist())
        bundle = DataBundle(train=train, val=val, calibration=calibration, classes=classes, image_size=cfg.image_size)
    log.info(
        "data %s: %d classes, train %d, val %d, calibration %d, %d px",
        cfg.source,
        bundle.num_classes,
        len(bundle.train),  # type: ignore[arg-type]
        len(bundle.val),  # type: ignore[arg-type]
        len(bundle.calibration),  # type: ignore[arg-type]
        bundle.image_size,
    )
    return bundle
