"""Seeded synthetic scenes for dense tasks: real handwritten digits placed on a canvas.

Each canvas holds a few of scikit-learn's 1,797 8×8 digits (shipped inside scikit-learn: no
download), resized with bilinear interpolation, given a random contrast and composited with
``max()``, plus distractor fragments of digit strokes (labelled background) and gaussian noise.
One call gives what segmentation, detection and a "classify the main digit among clutter"
variant need: images, per-pixel masks, boxes, labels and the main digit's class.

Train and val draw digits from disjoint pools (:func:`split_pools`), so val scenes hold
handwriting the model never saw. Everything is drawn up front from one seeded numpy generator and
rendered in batches with ``grid_sample``, so the same spec, seed and pool give bitwise identical
scenes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.schema import DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
NUM_CLASSES = 11  # background + digits 0..9 (digit d is mask value d + 1)

_SRC = 8  # side of a source digit in pixels
_STROKE = 0.5  # a pixel is part of a digit's stroke where it has at least half the digit's full ink
_TRIES = 20  # placement attempts per digit before it is dropped
_CHUNK = 128  # canvases rendered at once: layers take chunk × slots × S² floats
_FRAGMENT = (0.3, 0.6)  # side of a clutter crop as a fraction of a digit: never a whole digit


@dataclass(frozen=True)
class SceneSpec:
    """What a canvas looks like. Every knob has a default that gives a moderately hard scene.

    - ``image_size``: canvas side in pixels.
    - ``min_digits`` / ``max_digits``: digits attempted per canvas (uniform in the range; a digit
      that finds no place under ``max_overlap`` is dropped, so a canvas may hold fewer).
    - ``min_scale`` / ``max_scale``: a digit's side as a fraction of the canvas side.
    - ``min_contrast``: a digit's peak intensity is uniform in ``[min_contrast, 1]``.
    - ``clutter``: distractor fragments per canvas: rotated crops of digit strokes (a fraction of
      a digit, so never a whole one), drawn in the image but labelled background.
    - ``noise``: std of the gaussian noise added to the image (then clipped to [0, 1]).
    - ``ignore_border``: width in pixels of the ring just outside every digit's stroke labelled
      255 (ignore): the anti-aliased fringe is neither clearly digit nor background. 0 disables.
    - ``max_overlap``: the largest IoU a digit's placement box may have with one already placed.
    """

    image_size: int = 64
    min_digits: int = 2
    max_digits: int = 5
    min_scale: float = 0.18
    max_scale: float = 0.45
    min_contrast: float = 0.35
    clutter: int = 3
    noise: float = 0.03
    ignore_border: int = 1
    max_overlap: float = 0.2

    def __post_init__(self) -> None:
        checks = [
            (self.image_size >= 8, "image_size must be ≥ 8"),
            (1 <= self.min_digits <= self.max_digits, "need 1 ≤ min_digits ≤ max_digits"),
            (0 < self.min_scale <= self.max_scale <= 1, "need 0 < min_scale ≤ max_scale ≤ 1"),
            # Below ~4 px a digit is resampled from too few source pixels to keep a stroke.
            (self.min_scale * self.image_size >= 4, "min_scale × image_size must be ≥ 4 pixels"),
            (0 <= self.min_contrast <= 1, "min_contrast must be in [0, 1]"),
            (self.clutter >= 0, "clutter must be ≥ 0"),
            (self.noise >= 0, "noise must be ≥ 0"),
            (self.ignore_border >= 0, "ignore_border must be ≥ 0"),
            (0 <= self.max_overlap <= 1, "max_overlap must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SceneSpec: {message} (got {self})")


@dataclass
class Scenes:
    """``n`` rendered canvases of side ``S``.

    - ``images``: float32 ``N×1×S×S`` in [0, 1] (one channel; repeat it for RGB models).
    - ``masks``: uint8 ``N×S×S``: 0 background, digit ``d`` → ``d + 1``, 255 ignore.
    - ``boxes``: per canvas a float32 ``(k, 4)`` tensor, ``x1, y1, x2, y2`` in pixel-edge
      coordinates (a box covers pixel columns ``x1 .. x2 - 1``), tight around each placed digit's
      strokes, in drawing order.
    - ``labels``: per canvas an int64 ``(k,)`` tensor of digit classes 0..9, matching ``boxes``.
    - ``main_label``: int64 ``N``: the class of the digit with the largest box (first drawn on a
      tie); -1 only for a canvas where no digit kept a stroke (not seen with valid specs).
    - ``instance_masks`` (only when asked for, else None): per canvas a bool ``(k, S, S)`` tensor
      matching ``boxes``: each digit's visible stroke pixels, the pixels ``masks`` gives its
      class (where strokes overlap the digit drawn last owns them, as in ``masks``). A digit
      whose strokes are all covered has an empty mask.
    """

    images: torch.Tensor
    masks: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    main_label: torch.Tensor
    instance_masks: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as float32 ``N×1×8×8`` with peak 1, and their classes (cached: read-only)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)
    # Peak ink = 1 for every digit, so a digit's contrast is exactly its peak intensity.
    x = x / x.amax(dim=(1, 2), keepdim=True).clamp_min(1.0)
    return x.unsqueeze(1), d.target.astype(np.int64)


def split_pools(seed: int, val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint, class-stratified pools of digit indices: ``(train_pool, val_pool)``, sorted int64.

    The same split as the classification ``digits`` source for the same seed and fraction, so a
    digit never moves between train and val across tasks.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    _, y = _digits()
    train, val = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=y, random_state=seed)
    return np.sort(train).astype(np.int64), np.sort(val).astype(np.int64)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes broadcast over leading axes."""
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def _place_digits(spec: SceneSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Placement boxes ``(n, D, 4)`` (integer pixels) and which slots hold a digit ``(n, D)``.

    Vectorised over canvases: slot ``j`` of every canvas is placed at once, trying ``_TRIES``
    candidate positions and keeping the first whose IoU with every earlier digit is acceptable.
    """
    s, d = spec.image_size, spec.max_digits
    count = rng.integers(spec.min_digits, spec.max_digits + 1, size=n)
    side = np.clip(np.rint(rng.uniform(spec.min_scale, spec.max_scale, size=(n, d)) * s), 1, s)
    boxes = np.zeros((n, d, 4))
    placed = np.zeros((n, d), dtype=bool)
    for j in range(d):
        w = side[:, j]
        x0 = rng.integers(0, s - w + 1, size=(_TRIES, n))
        y0 = rng.integers(0, s - w + 1, size=(_TRIES, n))
        cand = np.stack([x0, y0, x0 + w, y0 + w], axis=-1).astype(np.float64)  # (T, n, 4)
        iou = _iou(cand[:, :, None, :], boxes[None, :, :j, :])  # (T, n, j)
        ok = ((iou <= spec.max_overlap) | ~placed[None, :, :j]).all(axis=-1)  # (T, n)
        first = ok.argmax(axis=0)
        take = (j < count) & ok.any(axis=0)
        boxes[take, j] = cand[first, np.arange(n)][take]
        placed[:, j] = take
    return boxes, placed


def _affines(
    spec: SceneSpec, n: int, rng: np.random.Generator, boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per layer (digits first, then clutter): canvas→source affine ``A (n, L, 2, 2)``, offset
    ``b (n, L, 2)``, source window centre and half-side ``(n, L, 2)``, all in source pixels.

    A canvas point ``p`` (continuous pixel coordinates) samples the source at ``A @ p + b``;
    samples outside the window are blank (a digit's window is the whole 8×8, a fragment's a crop).
    """
    d, c, s = spec.max_digits, spec.clutter, spec.image_size
    A = np.zeros((n, d + c, 2, 2))
    b = np.zeros((n, d + c, 2))
    centre = np.full((n, d + c, 2), _SRC / 2)
    half = np.full((n, d + c, 2), _SRC / 2)
    # Digits: an axis-aligned resize of the 8×8 source onto its placement box.
    k = _SRC / np.maximum(boxes[..., 2] - boxes[..., 0], 1)  # source px per canvas px
    A[:, :d, 0, 0] = A[:, :d, 1, 1] = k
    b[:, :d] = -boxes[..., :2] * k[..., None]
    if c:
        # Fragments: a square crop of a digit drawn at digit scale, rotated about its centre.
        k = _SRC / (rng.uniform(spec.min_scale, spec.max_scale, size=(n, c)) * s)
        crop = rng.uniform(*_FRAGMENT, size=(n, c)) * _SRC
        at = rng.uniform(crop[..., None] / 2, _SRC - crop[..., None] / 2, size=(n, c, 2))
        theta = rng.uniform(0, 2 * math.pi, size=(n, c))
        where = rng.uniform(0, s, size=(n, c, 2))
        cos, sin = np.cos(theta) * k, np.sin(theta) * k
        rot = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)  # k · R(-θ)
        A[:, d:] = rot
        b[:, d:] = at - np.einsum("nlij,nlj->nli", rot, where)
        centre[:, d:] = at
        half[:, d:] = crop[..., None] / 2
    return A, b, centre, half


def _render(
    src: torch.Tensor, A: torch.Tensor, b: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, size: int
) -> torch.Tensor:
    """Sample ``L`` sources ``(L, 1, 8, 8)`` through their affines onto ``(L, S, S)`` canvases.

    Bilinear with border padding inside the window: on an axis-aligned digit this equals
    ``F.interpolate(mode="bilinear", align_corners=False)`` to its box.
    """
    p = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    norm = 2.0 / _SRC  # source pixels -> grid_sample's [-1, 1] (align_corners=False)
    # The map is affine, so each source coordinate is (term in canvas x) + (term in canvas y):
    # two (L, S, 2) rows broadcast-added, far cheaper than a product per pixel. Elementwise ops
    # (not a matmul) also keep the result identical for any thread count. Offsets are taken from
    # the window centre so the window test needs no extra full-size subtraction.
    along_x = (A[:, None, :, 0] * p[None, :, None]) * norm
    along_y = (A[:, None, :, 1] * p[None, :, None] + (b - centre)[:, None, :]) * norm
    offset = along_x[:, None, :, :] + along_y[:, :, None, :]  # (L, S_y, S_x, 2)
    inside = (offset.abs() <= (half * norm)[:, None, None, :]).all(dim=-1)
    grid = offset.add_((centre * norm - 1.0)[:, None, None, :])
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0] * inside


def _first_last(any_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first and one past the last True along the last axis (0, 0 when none)."""
    s = any_.shape[-1]
    hit = any_.any(dim=-1)
    first = any_.to(torch.uint8).argmax(dim=-1)
    last = s - any_.flip(-1).to(torch.uint8).argmax(dim=-1)
    return torch.where(hit, first, 0), torch.where(hit, last, 0)


def make_scenes(spec: SceneSpec, n: int, *, seed: int, pool: np.ndarray, instances: bool = False) -> Scenes:
    """Render ``n`` canvases described by ``spec`` from digits whose indices are in ``pool``.

    ``pool`` holds indices into scikit-learn's digits (see :func:`split_pools`); digits and clutter
    fragments are drawn from it with replacement. The same spec, seed and pool give bitwise
    identical scenes. ``instances`` also keeps each digit's own mask (``Scenes.instance_masks``);
    it changes nothing else. Raises ValueError for an empty pool or indices out of range.
    """
    images_all, classes_all = _digits()
    pool = np.asarray(pool, dtype=np.int64).ravel()
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    if pool.size == 0 or pool.min() < 0 or pool.max() >= len(classes_all):
        raise ValueError(f"pool must be a non-empty array of digit indices in 0..{len(classes_all) - 1}")
    s, d, c = spec.image_size, spec.max_digits, spec.clutter
    rng = np.random.default_rng(seed)
    boxes, placed = _place_digits(spec, n, rng)
    # Digits before clutter, from separate draws: changing `clutter` leaves the digits alone.
    which = rng.choice(pool, size=(n, d))
    contrast = rng.uniform(spec.min_contrast, 1.0, size=(n, d))
    if c:
        which = np.concatenate([which, rng.choice(pool, size=(n, c))], axis=1)
        contrast = np.concatenate([contrast, rng.uniform(spec.min_contrast, 1.0, size=(n, c))], axis=1)
    A, b, centre, half = _affines(spec, n, rng, boxes)
    cls = torch.from_numpy(classes_all[which[:, :d]])  # (n, D)
    noise_gen = torch.Generator().manual_seed(seed)

    images = torch.empty((n, 1, s, s), dtype=torch.float32)
    masks = torch.zeros((n, s, s), dtype=torch.uint8)
    tight = torch.zeros((n, d, 4), dtype=torch.float32)
    kept = torch.from_numpy(placed).clone()
    owned = torch.zeros((n, d, s, s), dtype=torch.bool) if instances else None
    layer_on = torch.cat([kept, torch.ones((n, c), dtype=torch.bool)], dim=1)  # clutter always drawn
    f32 = lambda a: torch.from_numpy(a).to(torch.float32)  # noqa: E731
    A_t, b_t, centre_t, half_t, contrast_t = map(f32, (A, b, centre, half, contrast))
    which_t = torch.from_numpy(which)

    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        on = layer_on[lo:hi]
        ink = torch.zeros((hi - lo, d + c, s, s), dtype=torch.float32)
        if on.any():
            ink[on] = _render(
                images_all[which_t[lo:hi][on]], A_t[lo:hi][on], b_t[lo:hi][on],
                centre_t[lo:hi][on], half_t[lo:hi][on], s,
            )
        # Image: max() compositing, so a stroke is never darkened by anything drawn over it.
        img = (ink * contrast_t[lo:hi, :, None, None]).amax(dim=1, keepdim=True)
        if spec.noise > 0:
            img = img + spec.noise * torch.randn(img.shape, generator=noise_gen)
        images[lo:hi] = img.clamp_(0.0, 1.0)

        stroke = ink[:, :d] >= _STROKE  # (m, D, S, S); unplaced slots are all False
        kept[lo:hi] &= stroke.flatten(2).any(dim=-1)  # a digit resampled to nothing is dropped
        x1, x2 = _first_last(stroke.any(dim=-2))
        y1, y2 = _first_last(stroke.any(dim=-1))
        tight[lo:hi] = torch.stack([x1, y1, x2, y2], dim=-1).float()
        # Mask: where strokes overlap, the digit drawn last wins. This agrees with max()
        # compositing: max() never darkens a stroke, so both digits' ink is visible there and the
        # label never names hidden ink; drawing order only breaks the tie.
        mask = torch.zeros((hi - lo, s, s), dtype=torch.uint8)
        owner = torch.full((hi - lo, s, s), -1, dtype=torch.int64)
        for j in range(d):
            mask = torch.where(stroke[:, j], (cls[lo:hi, j] + 1).to(torch.uint8)[:, None, None], mask)
            owner = torch.where(stroke[:, j], j, owner)
        if owned is not None:
            owned[lo:hi] = owner[:, None] == torch.arange(d)[None, :, None, None]
        if spec.ignore_border:
            fg = (mask > 0).float()[:, None]
            grown = F.max_pool2d(fg, 2 * spec.ignore_border + 1, stride=1, padding=spec.ignore_border)[:, 0] > 0
            mask[grown & (mask == 0)] = IGNORE_INDEX
        masks[lo:hi] = mask

    area = (tight[..., 2] - tight[..., 0]) * (tight[..., 3] - tight[..., 1])
    area = torch.where(kept, area, torch.tensor(-1.0))
    main = torch.where(kept.any(dim=1), cls.gather(1, area.argmax(dim=1, keepdim=True))[:, 0], -1)
    box_list = [tight[i][kept[i]] for i in range(n)]
    label_list = [cls[i][kept[i]] for i in range(n)]
    log.debug("scenes: %d canvases of %d px, %d digits", n, s, int(kept.sum()))
    inst = [owned[i][kept[i]] for i in range(n)] if owned is not None else None
    return Scenes(images=images, masks=masks, boxes=box_list, labels=label_list, main_label=main.to(torch.int64),
                  instance_masks=inst)


def scene_spec(cfg: "DataConfig") -> SceneSpec:
    """The generator's spec for `[data] image_size` and `[data.scenes]`."""
    s = cfg.scenes
    try:
        return SceneSpec(image_size=cfg.image_size, min_digits=s.min_digits, max_digits=s.max_digits,
                         min_scale=s.min_scale, max_scale=s.max_scale, min_contrast=s.min_contrast,
                         clutter=s.clutter, noise=s.noise, ignore_border=s.ignore_border, max_overlap=s.max_overlap)
    except ValueError as exc:
        raise ConfigError(f"data.scenes: {exc}") from None
