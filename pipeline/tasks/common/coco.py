"""Detection data in the COCO "instances" JSON format every detection user already has.

::

    images_dir/<file_name of each image>           (subfolders allowed, never outside images_dir)
    annotations.json  {"images": [...], "annotations": [...], "categories": [...]}

The JSON is read with the standard :mod:`json` module only. :func:`load_coco_split` checks a
split up front (every annotation, and every image file's header) so bad data stops the run
before training with one :class:`DataError` line naming the file and the image or annotation id.

Policies (the same for training targets and crowd regions):

- Boxes are COCO ``[x, y, w, h]`` in pixels, stored as ``x1, y1, x2, y2`` (pixel edges).
- A box with ``w <= 0`` or ``h <= 0`` is **refused** (an error): it is not an object.
- A box extending outside its image is **clipped** to the image, with one logged warning per
  split counting the clipped boxes (exporters often overshoot by a fraction of a pixel). If
  nothing is left after clipping (the box lies wholly outside) it is **refused**.
- Category ids may be non-contiguous; they map to contiguous labels ``0..C-1`` in ascending
  id order (:attr:`CocoSplit.category_ids` maps back). Train and val must share the category set.
- ``iscrowd = 1`` annotations are kept aside as crowd regions: never training targets; the
  evaluator ignores them as COCO does (a detection on a crowd is not a false positive).
- Images without annotations are kept (negatives).
- An image's ``width`` / ``height`` in the JSON, when given, must match the file's header.
- With ``masks`` (instance segmentation) every annotation, crowd or not, needs a
  ``segmentation`` (polygons or RLE, checked and decoded by :mod:`pipeline.tasks.common.coco_masks`);
  its mask is kept as a compressed RLE of the original image.

Images are letterboxed (:mod:`pipeline.tasks.common.letterbox`, re-exported here): resized with the aspect
ratio kept so the longer side is ``S``, centred on a grey canvas (0.5 in [0, 1]).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from pipeline.errors import DataError
from pipeline.tasks.common.letterbox import PAD_VALUE, boxes_from_letterbox, boxes_to_letterbox, letterbox

log = logging.getLogger(__name__)

__all__ = [
    "PAD_VALUE", "CocoDetectionDataset", "CocoImage", "CocoSplit", "boxes_from_letterbox", "boxes_to_letterbox",
    "check_same_categories", "detection_collate", "letterbox", "load_coco_split", "load_coco_splits",
]

_KEYS = ("images", "annotations", "categories")


@dataclass
class CocoImage:
    """One image of a split: its file, size, and boxes in original pixels (``x1, y1, x2, y2``)."""

    id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 (K, 4): training targets
    labels: np.ndarray  # int64 (K,): contiguous 0..C-1
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    crowd_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    # With masks: compressed RLEs (``counts`` a str) of the original image, matching boxes / crowd_boxes.
    masks: list[dict[str, Any]] | None = None
    crowd_masks: list[dict[str, Any]] | None = None


@dataclass
class CocoSplit:
    """A checked split: images in JSON order, and the class table shared with the other split."""

    images: list[CocoImage]
    category_ids: list[int]  # contiguous label -> original COCO category id
    class_names: list[str]  # contiguous label -> category name
    annotations: Path  # the JSON file (named in later messages)
    what: str  # "train" / "val"

    def __len__(self) -> int:
        return len(self.images)


def _pil_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # SyntaxError: what some PIL plugins raise on a malformed header.
    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not an id


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """The parsed top-level object, with its three lists present."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} annotations {path} does not exist; point it at a COCO instances JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} annotations {path} ({type(exc).__name__}: {exc}); fix or replace the file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix or re-export the file"
        ) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a JSON {type(data).__name__}, not an object; expected COCO instances JSON")
    for key in _KEYS:
        if key not in data:
            raise DataError(f"{path}: missing the {key!r} key; a COCO instances file needs 'images', 'annotations' and 'categories'")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: {key!r} must be a list, got a JSON {type(data[key]).__name__}")
    return data


def _categories(path: Path, raw: list[Any]) -> tuple[dict[int, int], list[int], list[str]]:
    """``original id -> contiguous label``, and the ids and names in label order."""
    names: dict[int, str] = {}
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise DataError(f"{path}: category #{i} has no integer 'id'; every category needs an id and a name")
        if c["id"] in names:
            raise DataError(f"{path}: category id {c['id']} is listed twice; category ids must be unique")
        names[c["id"]] = str(c.get("name", c["id"]))
    if not names:
        raise DataError(f"{path}: 'categories' is empty; detection needs at least one category")
    ids = sorted(names)
    return {cid: k for k, cid in enumerate(ids)}, ids, [names[cid] for cid in ids]


def _image_file(images_dir: Path, path: Path, image: dict[str, Any]) -> Path:
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{path}: image id {image['id']} has no 'file_name'")
    rel = PurePosixPath(name.replace("\\", "/"))
    # A file_name must stay inside images_dir: annotation files come from elsewhere.
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{path}: image id {image['id']} file_name {name!r} leaves the images folder; use a path relative to {images_dir}")
    return images_dir / Path(*rel.parts)


def _header_size(file: Path, path: Path, image_id: int) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding pixels."""
    from PIL import Image

    if not file.is_file():
        raise DataError(f"{path}: image id {image_id}: file {file} does not exist; add it or remove the image and its annotations")
    try:
        with Image.open(file) as img:
            return img.size
    except _pil_errors() as exc:
        raise DataError(f"{path}: image id {image_id}: cannot read {file} ({type(exc).__name__}: {exc}); replace the file") from None


def _box(path: Path, ann: dict[str, Any], aid: Any, width: int, height: int) -> tuple[list[float], bool]:
    """The annotation's box as clipped ``x1, y1, x2, y2`` and whether clipping changed it."""
    b = ann.get("bbox")
    if not (isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)):
        raise DataError(f"{path}: annotation id {aid}: 'bbox' must be [x, y, w, h] (4 finite numbers), got {b!r}")
    x, y, w, h = (float(v) for v in b)
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: annotation id {aid}: bbox {b} has width or height ≤ 0; fix or remove the annotation")
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        raise DataError(
            f"{path}: annotation id {aid}: bbox {b} lies outside its image ({width}×{height}, image id "
            f"{ann['image_id']}); fix or remove the annotation"
        )
    return [x1, y1, x2, y2], (x1, y1, x2, y2) != (x, y, x + w, y + h)


def _mask_rle(path: Path, ann: dict[str, Any], aid: Any, im: CocoImage) -> dict[str, Any]:
    """The annotation's ``segmentation`` as a checked compressed RLE of its image (``counts`` a str)."""
    from pipeline.tasks.common.coco_masks import segmentation_rle

    rle = segmentation_rle(ann.get("segmentation"), im.height, im.width, path=path, aid=aid)
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def load_coco_split(images_dir: Path, annotations: Path, *, what: str, masks: bool = False) -> CocoSplit:
    """Read and check one split of a COCO instances dataset (see the module docstring's policies).

    ``what`` ("train" / "val") names the split in messages. Every image file's header is opened
    (existence, readability, size); pixels are decoded later, per item. Raises :class:`DataError`
    (one line naming the file and the image or annotation id) for malformed JSON, a missing key,
    a dangling image or category id, a missing or unreadable image, a size mismatch, a refused
    box, or a split without images; with ``masks`` also for a missing or malformed
    ``segmentation`` (:func:`pipeline.tasks.common.coco_masks.segmentation_rle`).
    """
    images_dir, annotations = Path(images_dir), Path(annotations)
    data = _read_json(annotations, what)
    if not images_dir.is_dir():
        raise DataError(f"{what} images folder {images_dir} does not exist; point it at the folder holding the images of {annotations}")
    label_of, category_ids, class_names = _categories(annotations, data["categories"])

    images: dict[int, CocoImage] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise DataError(f"{annotations}: image #{i} has no integer 'id'; every image needs an id and a file_name")
        iid = im["id"]
        if iid in images:
            raise DataError(f"{annotations}: image id {iid} is listed twice; image ids must be unique")
        file = _image_file(images_dir, annotations, im)
        w, h = _header_size(file, annotations, iid)
        jw, jh = im.get("width", w), im.get("height", h)
        if (jw, jh) != (w, h):
            raise DataError(
                f"{annotations}: image id {iid} is {jw}×{jh} in the JSON but {file} is {w}×{h}; "
                "boxes would be in the wrong frame: fix width/height or the file"
            )
        images[iid] = CocoImage(iid, file, w, h, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    if not images:
        raise DataError(f"{annotations}: the {what} split has no images; add images to the 'images' list")

    targets: dict[int, tuple[list, list, list, list]] = {iid: ([], [], [], []) for iid in images}
    rles: dict[int, tuple[list, list]] = {iid: ([], []) for iid in images}
    clipped, first_clipped = 0, None
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{annotations}: annotation #{i} is not a JSON object")
        aid = ann.get("id", f"#{i}")
        iid, cid = ann.get("image_id"), ann.get("category_id")
        if not _is_int(iid) or iid not in images:
            raise DataError(f"{annotations}: annotation id {aid} points to image id {iid!r}, which is not in 'images'; fix or remove it")
        if not _is_int(cid) or cid not in label_of:
            raise DataError(
                f"{annotations}: annotation id {aid} has category id {cid!r}, which is not in 'categories' "
                f"(ids {', '.join(map(str, category_ids))}); fix the annotation or add the category"
            )
        im = images[iid]
        box, was_clipped = _box(annotations, ann, aid, im.width, im.height)
        if was_clipped:
            clipped += 1
            first_clipped = aid if first_clipped is None else first_clipped
        boxes, labels, crowd, crowd_labels = targets[iid]
        crowd_flag = ann.get("iscrowd", 0)
        if crowd_flag not in (0, 1):  # bool compares equal to 0/1 too: fine
            raise DataError(f"{annotations}: annotation id {aid} has iscrowd = {crowd_flag!r}; must be 0 or 1")
        (crowd if crowd_flag else boxes).append(box)
        (crowd_labels if crowd_flag else labels).append(label_of[cid])
        if masks:
            rles[iid][1 if crowd_flag else 0].append(_mask_rle(annotations, ann, aid, im))
    for iid, (boxes, labels, crowd, crowd_labels) in targets.items():
        im = images[iid]
        im.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        im.labels = np.asarray(labels, np.int64)
        im.crowd_boxes = np.asarray(crowd, np.float32).reshape(-1, 4)
        im.crowd_labels = np.asarray(crowd_labels, np.int64)
        if masks:
            im.masks, im.crowd_masks = rles[iid]
    if clipped:
        log.warning("%s: %d box(es) extended outside their image and were clipped to it (first: annotation id %s)",
                    annotations, clipped, first_clipped)
    split = CocoSplit(list(images.values()), category_ids, class_names, annotations, what)
    n_boxes = sum(len(im.boxes) for im in split.images)
    log.info("coco %s %s: %d images, %d boxes, %d categories", what, annotations, len(split), n_boxes, len(category_ids))
    return split


def check_same_categories(train: CocoSplit, val: CocoSplit) -> None:
    """A :class:`DataError` naming the difference unless both splits have the same categories (ids and names)."""
    a = dict(zip(train.category_ids, train.class_names))
    b = dict(zip(val.category_ids, val.class_names))
    if a == b:
        return
    show = lambda d, keys: ", ".join(f"{k} {d[k]!r}" for k in sorted(keys))  # noqa: E731
    parts = []
    if set(a) - set(b):
        parts.append(f"only in {train.annotations}: {show(a, set(a) - set(b))}")
    if set(b) - set(a):
        parts.append(f"only in {val.annotations}: {show(b, set(b) - set(a))}")
    renamed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if renamed:
        parts.append("named differently: " + ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in renamed))
    raise DataError(f"train and val categories differ ({'; '.join(parts)}); both files need the same 'categories'")


def load_coco_splits(train_images: Path, train_annotations: Path, val_images: Path,
                     val_annotations: Path, *, masks: bool = False) -> tuple[CocoSplit, CocoSplit]:
    """Both splits via :func:`load_coco_split`, checked to share one category set."""
    train = load_coco_split(train_images, train_annotations, what="train", masks=masks)
    val = load_coco_split(val_images, val_annotations, what="val", masks=masks)
    check_same_categories(train, val)
    return train, val


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


class CocoDetectionDataset(Dataset):
    """Items ``(float32 3×S×S normalised image, target)`` from a :class:`CocoSplit`.

    ``target``: ``boxes`` float32 K×4 ``x1, y1, x2, y2`` in letterboxed pixels, ``labels`` int64
    K (contiguous), ``crowd_boxes`` / ``crowd_labels`` (the same for crowd regions),
    ``image_id``, ``orig_size`` ``(h, w)``, ``scale`` and ``pad`` ``(left, top)`` (see
    :func:`letterbox`); for a split read with masks also ``masks``, ``rles`` and ``crowd_rles``
    (see :meth:`_masks`). With ``augment`` (training only) the original image and its boxes are
    flipped horizontally together with probability 0.5 *before* letterboxing, so ``scale`` and
    ``pad`` still describe the item. Randomness comes from torch's global RNG.
    """

    def __init__(self, split: CocoSplit, image_size: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float], *, augment: bool):
        self.split = split
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment

    @property
    def class_names(self) -> list[str]:
        """Category names in contiguous label order."""
        return self.split.class_names

    def __len__(self) -> int:
        return len(self.split)

    def _open(self, im: CocoImage) -> Any:
        from PIL import Image

        try:
            with Image.open(im.path) as img:
                img.load()  # decode now, inside the try, so a corrupt file names itself
                img = img.convert("RGB")
        except _pil_errors() as exc:
            raise DataError(f"cannot read {im.path} (image id {im.id} of {self.split.annotations}; "
                            f"{type(exc).__name__}: {exc}); replace the file") from None
        if img.size != (im.width, im.height):
            raise DataError(f"{im.path} (image id {im.id}) is now {img.size[0]}×{img.size[1]}, was {im.width}×{im.height} "
                            "when the split was checked; the file changed during the run")
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from PIL import Image

        im = self.split.images[i]
        img = self._open(im)
        boxes, crowd = im.boxes, im.crowd_boxes
        flip = self.augment and bool(torch.rand(()) < 0.5)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes, crowd = _flip_boxes(boxes, im.width), _flip_boxes(crowd, im.width)
        x, scale, pad = letterbox(img, self.image_size)
        extra = self._masks(im, flip, scale, pad) if im.masks is not None else {}
        target = {
            "boxes": boxes_to_letterbox(boxes, scale, pad),
            "labels": torch.from_numpy(im.labels.copy()),
            "crowd_boxes": boxes_to_letterbox(crowd, scale, pad),
            "crowd_labels": torch.from_numpy(im.crowd_labels.copy()),
            "image_id": im.id,
            "orig_size": (im.height, im.width),
            "scale": scale,
            "pad": pad,
            **extra,
        }
        return (x - self.mean) / self.std, target

    def _masks(self, im: CocoImage, flip: bool, scale: float, pad: tuple[int, int]) -> dict[str, Any]:
        """A split read with masks: ``masks`` uint8 K×S×S in the letterboxed frame (for training),
        and the original-image RLEs ``rles`` / ``crowd_rles`` (what evaluation scores against;
        left out of a flipped item, which is never evaluated)."""
        from pipeline.tasks.common.coco_masks import decode
        from pipeline.tasks.common.letterbox import masks_to_letterbox

        full = np.stack([decode(r) for r in im.masks]) if im.masks else np.zeros((0, im.height, im.width), np.uint8)
        if flip:
            full = np.ascontiguousarray(full[:, :, ::-1])
        out: dict[str, Any] = {"masks": masks_to_letterbox(full, scale, pad, self.image_size)}
        if not flip:
            out["rles"], out["crowd_rles"] = list(im.masks), list(im.crowd_masks or [])
        return out


def detection_collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack the images (N×3×S×S) and keep the targets as a list: their box counts differ."""
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


def coco_datasets(train_split: CocoSplit, val_split: CocoSplit, cfg: Any,
                  share: Callable[[Dataset], Dataset]) -> tuple[Dataset, Dataset, Dataset, list[str]]:
    """The training set (``share`` of it: ``[data] train_fraction``), the same images under the
    eval transform (calibration draws from it), the val set and the class names of a COCO source."""
    s, mean, std = cfg.image_size, cfg.mean, cfg.std
    train = share(CocoDetectionDataset(train_split, s, mean, std, augment=cfg.augment))
    plain: Dataset = CocoDetectionDataset(train_split, s, mean, std, augment=False)
    if isinstance(train, Subset):
        plain = Subset(plain, train.indices)
    return train, plain, CocoDetectionDataset(val_split, s, mean, std, augment=False), list(train_split.class_names)
