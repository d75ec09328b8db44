"""Images without labels that distillation learns from (``[distill] unlabeled``).

MGD and KD need no labels: a user with a few labelled images and many more from the device can
distil on all of them. Two sources:

- a folder: every image file under it (recursively, any format PIL reads), turned into the
  task's input exactly as its evaluation images are (resized, or letterboxed for detection;
  ``Task.unlabeled_transform``);
- ``"rest"``: the part of the training split that ``[distill] train_fraction`` leaves out, its
  labels unused (with the training split's own augmentation).

Everything is checked before anything trains: a missing or empty folder, an unreadable image,
``"rest"`` with nothing left out are one-line :class:`ConfigError`\\ s. What was used is
recorded: the image count and a SHA-256 of the list (relative paths, or training positions).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.data import Dataset, Subset

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.data import DataBundle

REST = "rest"


def image_suffixes() -> frozenset[str]:
    """File suffixes PIL opens (``.png``, ``.jpg``, ``.webp``, ...), lower case."""
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def scan_folder(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted), each checked to open; a
    :class:`ConfigError` naming the key for a missing or empty folder or an unreadable image."""
    from PIL import Image

    if not root.is_dir():
        raise ConfigError(f"distill.unlabeled: {root} is not a folder (give a folder of images, or \"rest\")")
    suffixes = image_suffixes()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ConfigError(f"distill.unlabeled: no image files under {root} (looked for "
                          f"{', '.join(sorted(s for s in suffixes if s in ('.png', '.jpg', '.jpeg', '.bmp', '.webp')))}, …)")
    for path in files:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken file
            raise ConfigError(f"distill.unlabeled: cannot read image {path} ({type(exc).__name__}: {exc}); "
                              "remove or replace the file") from None
    return files


class FolderImages(Dataset):
    """Image files as model inputs, through one transform (PIL image → 3×S×S tensor)."""

    def __init__(self, files: list[Path], transform: Callable[[Any], torch.Tensor]):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB"))


class WithoutTargets(Dataset):
    """A labelled dataset's images alone."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[i][0]


@dataclass(frozen=True)
class Unlabeled:
    """The unlabelled images of a run: the dataset, how many, and a hash of their list."""

    dataset: Dataset
    count: int
    sha256: str
    source: str

    def record(self) -> dict[str, Any]:
        """What the manifest records."""
        return {"unlabeled_images": self.count, "unlabeled_sha256": self.sha256, "unlabeled_source": self.source}


def _digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def check(spec: str, train_fraction: float, base_dir: Path) -> None:
    """Preflight of ``[distill] unlabeled`` (before anything trains)."""
    if not spec:
        return
    if spec == REST:
        if train_fraction >= 1.0:
            raise ConfigError("distill.unlabeled = \"rest\" needs distill.train_fraction < 1: \"rest\" is the part of "
                              "the training split the students do not get labels for, and with 1 there is none")
        return
    scan_folder(_folder(spec, base_dir))


def _folder(spec: str, base_dir: Path) -> Path:
    p = Path(spec).expanduser()
    return p if p.is_absolute() else base_dir / p


def load(spec: str, bundle: "DataBundle", *, train_fraction: float, seed: int, base_dir: Path,
         transform: Callable[[], Callable[[Any], torch.Tensor]]) -> Unlabeled | None:
    """The unlabelled images ``spec`` names ("" → None); ``transform()`` gives what makes a
    folder's files the task's inputs (asked for only then); ``"rest"`` takes the training images
    outside the students' seeded share."""
    if not spec:
        return None
    if spec == REST:
        check(spec, train_fraction, base_dir)
        share = bundle.with_train_share(train_fraction, seed).train
        kept = set(share.indices) if isinstance(share, Subset) else set(range(len(bundle.train)))  # type: ignore[arg-type]
        rest = [i for i in range(len(bundle.train)) if i not in kept]  # type: ignore[arg-type]
        if not rest:
            raise ConfigError("distill.unlabeled = \"rest\": the students' share is the whole training split")
        return Unlabeled(WithoutTargets(Subset(bundle.train, rest)), len(rest), _digest([str(i) for i in rest]), REST)
    root = _folder(spec, base_dir)
    files = scan_folder(root)
    names = [p.relative_to(root).as_posix() for p in files]
    return Unlabeled(FolderImages(files, transform()), len(files), _digest(names), str(root))
