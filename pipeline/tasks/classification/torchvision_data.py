"""The ``torchvision`` classification source: a ``torchvision.datasets`` class by name (CIFAR10,
MNIST, ...), its train/test splits from ``[data] root`` (downloaded only with ``download``)."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from pipeline.errors import ConfigError
from pipeline.schema import DataConfig
from pipeline.data import TransformedDataset, labels_of, resolve_path
from pipeline.tasks.classification.transforms import eval_transform

def _torchvision_dataset_names() -> list[str]:
    import torchvision.datasets as tvd

    return sorted(
        n
        for n in dir(tvd)
        if inspect.isclass(getattr(tvd, n))
        and issubclass(getattr(tvd, n), tvd.VisionDataset)
        and n not in ("VisionDataset", "DatasetFolder", "ImageFolder")
    )


def check_torchvision(cfg: DataConfig, base_dir: Path) -> tuple[type, Path]:
    import torchvision.datasets as tvd

    names = _torchvision_dataset_names()
    if cfg.name not in names:
        lower = {n.lower(): n for n in names}
        close = difflib.get_close_matches(cfg.name, names, n=3, cutoff=0.5)
        close += [lower[m] for m in difflib.get_close_matches(cfg.name.lower(), list(lower), n=3, cutoff=0.5)]
        close = list(dict.fromkeys(close))[:3]
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.datasets for the names"
        raise ConfigError(f"data.name = {cfg.name!r}: not a torchvision dataset; {hint}")
    root = resolve_path(cfg.root, base_dir, default="data")
    if not cfg.download and not root.is_dir():
        raise ConfigError(
            f"data.root = '{root}': directory does not exist and data.download = false; "
            f"set data.download = true (needs a network) or put the {cfg.name} files under {root}"
        )
    return getattr(tvd, cfg.name), root


def _make_torchvision(cls: type, root: Path, train: bool, cfg: DataConfig) -> Dataset:
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    # Datasets disagree on how to choose the split: `train=True/False` (CIFAR, MNIST) or
    # `split="train"/"test"` (SVHN, STL10, Food101, ...).
    if "train" in params:
        kwargs["train"] = train
    elif "split" in params:
        kwargs["split"] = "train" if train else "test"
    if "download" in params:
        kwargs["download"] = cfg.download
    split = "train" if train else "test"
    try:
        return cls(str(root), **kwargs)
    except (RuntimeError, FileNotFoundError) as exc:
        if not cfg.download:
            raise ConfigError(
                f"data.download = false and {cfg.name} ({split} split) is not under data.root '{root}'; "
                f"set data.download = true (needs a network) or put the files there ({exc})"
            ) from None
        raise ConfigError(f"data.name = {cfg.name!r}: could not download/read the {split} split into '{root}': {exc}") from None
    except OSError as exc:  # network failures (URLError) and unreadable files
        raise ConfigError(f"data.name = {cfg.name!r}: could not get the {split} split into '{root}': {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"data.name = {cfg.name!r}: cannot be built as a classification dataset with a train/test split ({exc})"
        ) from None


def load_torchvision(cfg: DataConfig, base_dir: Path) -> tuple[Dataset, Dataset, list[str], np.ndarray | None]:
    cls, root = check_torchvision(cfg, base_dir)
    train_raw = _make_torchvision(cls, root, True, cfg)
    val_raw = _make_torchvision(cls, root, False, cfg)
    labels = labels_of(train_raw)
    classes = getattr(train_raw, "classes", None)
    if not classes:
        if labels is None:
            raise ConfigError(f"data.name = {cfg.name!r}: cannot tell its classes (no classes/targets/labels attribute)")
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return train_raw, TransformedDataset(val_raw, eval_transform(cfg)), [str(c) for c in classes], labels
