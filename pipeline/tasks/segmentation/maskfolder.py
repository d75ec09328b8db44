"""Segmentation data in the VOC / Cityscapes-style layout users already have.

::

    root/train/images/<name>.<png|jpg|jpeg|bmp|tif|tiff|webp>
    root/train/masks/<name>.png
    root/val/images/...
    root/val/masks/...

An image and its mask share the file stem. A mask is a single-channel PNG ("L", "I" or a "P"
palette, read by palette *index*, never by colour) whose pixel value is the class index;
255 means ignore. :func:`scan_split` checks a split up front (every mask read in full) so a bad
file stops the run before training with one line naming it, not a traceback mid-epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = ".png"
# Single-channel modes whose pixel values are the class indices ("P": the palette index).
MASK_MODES = frozenset({"1", "L", "P", "I", "I;16", "I;16L", "I;16B"})


def _pil_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # SyntaxError: what some PIL plugins raise on a malformed header.
    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _unreadable(path: Path, exc: BaseException) -> DataError:
    return DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); remove or replace the file")


def _files(folder: Path, suffixes: tuple[str, ...], layout: str) -> dict[str, Path]:
    """``stem -> path`` for the files of ``folder`` with one of ``suffixes`` (other files ignored)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in suffixes:
            continue
        if p.stem in found:
            raise DataError(
                f"{folder}: two files share the stem {p.stem!r} ({found[p.stem].name}, {p.name}); "
                f"keep one so each image pairs with one mask ({layout})"
            )
        found[p.stem] = p
    return found


def _read_mask(path: Path) -> np.ndarray:
    """A mask's class indices as an integer array (decodes the whole file)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
            values = np.asarray(img).astype(np.int64, copy=False) if mode in MASK_MODES else None  # "P": indices
    except _pil_errors() as exc:
        raise _unreadable(path, exc) from None
    if values is None:
        raise DataError(_bad_mode(path, mode))
    return values


def _bad_mode(path: Path, mode: str) -> str:
    return (f"{path}: mask has mode {mode!r}; masks must be single-channel PNGs (L, I or P palette) "
            "whose pixel value is the class index")


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding pixels."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except _pil_errors() as exc:
        raise _unreadable(path, exc) from None


def _check_values(path: Path, mask: np.ndarray, num_classes: int) -> None:
    flat = mask.ravel()
    # bincount is linear time, unlike np.unique's sort: it matters on Cityscapes-sized masks.
    values = np.flatnonzero(np.bincount(flat)) if flat.size and flat.min() >= 0 else np.unique(flat)
    bad = values[((values >= num_classes) | (values < 0)) & (values != IGNORE_INDEX)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
        raise DataError(
            f"{path}: class {'index' if bad.size == 1 else 'indices'} {shown} but data.num_classes = {num_classes} "
            f"(allowed 0..{num_classes - 1} and {IGNORE_INDEX} = ignore); fix the mask or raise data.num_classes"
        )


def scan_split(root: Path, split: str, num_classes: int) -> list[tuple[Path, Path]]:
    """Check ``root/split`` and return its ``(image, mask)`` pairs sorted by stem.

    Every mask is decoded in full (values checked against ``num_classes``, 255 = ignore); image
    sizes come from file headers only. Raises :class:`DataError` (one line naming the file and
    what to do) for a missing folder, an unpaired file, a size mismatch, a class index out of
    range, an unreadable file or an empty split.
    """
    if not 1 <= num_classes <= IGNORE_INDEX:
        raise ConfigError(
            f"data.num_classes = {num_classes}: must be 1..{IGNORE_INDEX} ({IGNORE_INDEX} is the ignore index)"
        )
    root = Path(root)
    layout = f"expected {root}/{split}/images/<name>.png|.jpg|... and {root}/{split}/masks/<name>.png"
    for sub in ("images", "masks"):
        if not (root / split / sub).is_dir():
            raise DataError(f"data.root = '{root}': missing {split}/{sub}/ folder; {layout}")
    images = _files(root / split / "images", IMAGE_SUFFIXES, layout)
    masks = _files(root / split / "masks", (MASK_SUFFIX,), layout)

    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        first = images[no_mask[0]]
        # A mask saved as JPEG is the usual cause: say so rather than "missing".
        other = sorted(p.name for p in (root / split / "masks").iterdir() if p.stem == no_mask[0])
        hint = f" (found {other[0]}: masks must be lossless .png)" if other else ""
        raise DataError(
            f"{first} has no mask {root / split / 'masks' / (no_mask[0] + MASK_SUFFIX)}{hint} "
            f"({len(no_mask)} image(s) in {split}/images/ without a mask); add the masks or remove the images"
        )
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise DataError(
            f"{masks[no_image[0]]} has no image of the same name in {root / split / 'images'} "
            f"({len(no_image)} mask(s) in {split}/masks/ without an image); add the images or remove the masks"
        )
    if not images:
        raise DataError(f"data.root = '{root}': {split}/ has no image/mask pairs; {layout}")

    pairs = [(images[stem], masks[stem]) for stem in sorted(images)]
    for image_path, mask_path in pairs:
        mask = _read_mask(mask_path)
        size = _image_size(image_path)
        if (mask.shape[1], mask.shape[0]) != size:
            raise DataError(
                f"{mask_path}: mask is {mask.shape[1]}×{mask.shape[0]} but its image {image_path.name} is "
                f"{size[0]}×{size[1]} (width×height); a mask must match its image pixel for pixel"
            )
        _check_values(mask_path, mask, num_classes)
    log.info("maskfolder %s/%s: %d image/mask pairs checked", root, split, len(pairs))
    return pairs


class MaskFolderDataset(Dataset):
    """``(image, mask)`` pairs from :func:`scan_split` as training / evaluation items.

    Items are ``(float32 3×S×S normalised image, int64 S×S mask)``. Images of any size and mode
    (grayscale, palette, RGBA) become RGB resized bilinearly to ``S×S``; masks are resized with
    NEAREST so no new class values appear and 255 stays 255. With ``augment``, a random crop of
    ``min_crop``..1 of each side (1.0 disables it) and a random horizontal flip are applied to
    image and mask together. Randomness comes from torch's global RNG (DataLoader seeds workers).
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        augment: bool,
        min_crop: float = 0.6,
    ):
        if not 0 < min_crop <= 1:
            raise ValueError(f"min_crop must be in (0, 1], got {min_crop}")
        self.pairs = [(Path(i), Path(m)) for i, m in pairs]
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment
        self.min_crop = min_crop

    def __len__(self) -> int:
        return len(self.pairs)

    def _open(self, i: int) -> tuple[Any, Any]:
        from PIL import Image

        image_path, mask_path = self.pairs[i]
        loaded = []
        for path in (image_path, mask_path):
            try:
                with Image.open(path) as img:
                    img.load()  # decode now, inside the try, so a corrupt file names itself
                    loaded.append(img.copy())
            except _pil_errors() as exc:
                raise _unreadable(path, exc) from None
        image, mask = loaded
        if mask.mode not in MASK_MODES:
            raise DataError(_bad_mode(mask_path, mask.mode))
        if image.size != mask.size:
            raise DataError(
                f"{mask_path}: mask is {mask.size[0]}×{mask.size[1]} but its image {image_path.name} is "
                f"{image.size[0]}×{image.size[1]}; a mask must match its image pixel for pixel"
            )
        return image.convert("RGB"), mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image, mask = self._open(i)
        if self.augment and self.min_crop < 1:
            w, h = image.size
            f, fx, fy = torch.rand(3).tolist()
            side = self.min_crop + (1 - self.min_crop) * f
            cw, ch = max(1, round(w * side)), max(1, round(h * side))
            left, top = round((w - cw) * fx), round((h - ch) * fy)
            box = (left, top, left + cw, top + ch)
            image, mask = image.crop(box), mask.crop(box)
        s = self.image_size
        image = image.resize((s, s), Image.Resampling.BILINEAR)
        mask = mask.resize((s, s), Image.Resampling.NEAREST)  # never blend class indices
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
        y = torch.from_numpy(np.array(mask).astype(np.int64))
        if self.augment and bool(torch.rand(()) < 0.5):
            x, y = x.flip(-1), y.flip(-1)
        return (x - self.mean) / self.std, y
