"""Tests for pipeline.tasks.segmentation.maskfolder: VOC/Cityscapes-style image/mask trees built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ConfigError, DataError
from pipeline.tasks.segmentation.maskfolder import MaskFolderDataset, scan_split

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
C = 4  # classes in the test trees


def _mask(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Class-index blocks 0..C-1 with a few ignore (255) pixels."""
    rng = np.random.default_rng(seed)
    m = rng.integers(0, C, size=(h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
    m[0, :3] = 255
    return m.astype(np.uint8)


def _write_pair(root: Path, split: str, stem: str, w: int = 24, h: int = 16, *, ext: str = ".png",
                image_mode: str = "RGB", seed: int = 0) -> tuple[Path, Path]:
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).convert(image_mode)
    image_path = root / split / "images" / f"{stem}{ext}"
    img.save(image_path)
    mask_path = root / split / "masks" / f"{stem}.png"
    Image.fromarray(_mask(w, h, seed), mode="L").save(mask_path)
    return image_path, mask_path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    _write_pair(tmp_path, "train", "b", ext=".jpg", seed=1)
    _write_pair(tmp_path, "train", "a", seed=2, image_mode="L")
    _write_pair(tmp_path, "train", "c", 40, 30, ext=".bmp", seed=3, image_mode="RGBA")
    _write_pair(tmp_path, "val", "v", seed=4, image_mode="P")
    return tmp_path


def test_valid_tree_scans_sorted_and_loads(tree):
    pairs = scan_split(tree, "train", C)
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.jpg", "b.png"), ("c.bmp", "c.png")]
    assert all(i.parent.name == "images" and m.parent.name == "masks" for i, m in pairs)
    assert len(scan_split(tree, "val", C)) == 1

    ds = MaskFolderDataset(pairs, 20, MEAN, STD, augment=False)
    assert len(ds) == 3
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 20, 20) and x.dtype == torch.float32
        assert y.shape == (20, 20) and y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) <= set(range(C)) | {255}
        assert x.min() >= (0 - 0.5) / 0.25 - 1e-5 and x.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_same_size_is_the_image_and_mask_exactly(tree):
    image_path, mask_path = scan_split(tree, "train", C)[0]  # a.png: 24×16 grayscale
    x, y = MaskFolderDataset([(image_path, mask_path)], 24, MEAN, STD, augment=False)[0]
    # 24×16 -> 24×24 stretches rows only; compare through the same nearest resize.
    expected = np.asarray(Image.open(mask_path).resize((24, 24), Image.Resampling.NEAREST))
    assert np.array_equal(y.numpy(), expected.astype(np.int64))
    gray = np.asarray(Image.open(image_path).convert("RGB").resize((24, 24), Image.Resampling.BILINEAR))
    assert torch.allclose(x, (torch.from_numpy(gray / 255.0).permute(2, 0, 1).float() - 0.5) / 0.25, atol=1e-5)


def test_palette_mask_is_read_by_index(tmp_path):
    image_path, mask_path = _write_pair(tmp_path, "train", "p")
    idx = _mask(24, 16)
    pal = Image.fromarray(idx, mode="P")
    # Colours unrelated to the indices (and 255 coloured white as in VOC): the index must win.
    palette = [0] * 768
    for k in range(C):
        palette[3 * k : 3 * k + 3] = [200 - 40 * k, 17 * k + 3, 90]
    palette[3 * 255 : 3 * 255 + 3] = [224, 224, 192]
    pal.putpalette(palette)
    pal.save(mask_path)
    assert Image.open(mask_path).mode == "P"

    pairs = scan_split(tmp_path, "train", C)
    _, y = MaskFolderDataset(pairs, 24, MEAN, STD, augment=False)[0]
    expected = np.asarray(Image.fromarray(idx).resize((24, 24), Image.Resampling.NEAREST)).astype(np.int64)
    assert np.array_equal(y.numpy(), expected)
    assert (y == 255).any()


def test_mask_resize_is_nearest_and_keeps_ignore(tmp_path):
    image_path, mask_path = _write_pair(tmp_path, "train", "n", 37, 23)
    m = np.zeros((23, 37), dtype=np.uint8)
    m[:, 3:9] = 3
    m[9:14, 15:22] = 255  # inside every crop of ≥ 60 % of each side, so it must survive augment
    m[18:, :8] = 1
    Image.fromarray(m, mode="L").save(mask_path)
    pairs = scan_split(tmp_path, "train", C)
    torch.manual_seed(0)
    for size in (16, 29, 64):
        for augment in (False, True):
            ds = MaskFolderDataset(pairs, size, MEAN, STD, augment=augment)
            for _ in range(3):
                _, y = ds[0]
                values = set(torch.unique(y).tolist())
                assert values <= {0, 1, 3, 255}, values  # no blended values like 2 or 128
                assert 255 in values


def test_augment_flips_image_and_mask_together(tmp_path):
    image_path, mask_path = _write_pair(tmp_path, "train", "f", 16, 16)
    # Image brightness encodes the class so a mismatch between the two would show.
    m = np.zeros((16, 16), dtype=np.uint8)
    m[:, :5] = 2
    Image.fromarray(m, mode="L").save(mask_path)
    Image.fromarray(np.where(m == 2, 255, 0).astype(np.uint8)).convert("RGB").save(image_path)
    ds = MaskFolderDataset([(image_path, mask_path)], 16, (0, 0, 0), (1, 1, 1), augment=True, min_crop=1.0)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(20):
        x, y = ds[0]
        assert torch.equal(x[0] > 0.5, y == 2)
        flipped += int(y[0, -1] == 2)
    assert 0 < flipped < 20


def test_augment_crop_keeps_image_and_mask_aligned(tmp_path):
    image_path, mask_path = _write_pair(tmp_path, "train", "g", 40, 30)
    m = (np.add.outer(np.arange(30) // 6, np.arange(40) // 8) % 2).astype(np.uint8)  # checkerboard
    Image.fromarray(m, mode="L").save(mask_path)
    Image.fromarray(m * 255).convert("RGB").save(image_path)
    ds = MaskFolderDataset([(image_path, mask_path)], 32, (0, 0, 0), (1, 1, 1), augment=True, min_crop=0.5)
    torch.manual_seed(1)
    seen = set()
    for _ in range(10):
        x, y = ds[0]
        agree = ((x[0] > 0.5) == (y == 1)).float().mean()
        assert agree > 0.9  # only bilinear edge pixels may disagree
        seen.add(tuple(y[:, 0].tolist()))
    assert len(seen) > 1  # crops actually vary


# ---------------------------------------------------------------------------- errors


def _error(tree: Path, split: str = "train", num_classes: int = C) -> str:
    with pytest.raises(DataError) as info:
        scan_split(tree, split, num_classes)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folders(tmp_path):
    assert "missing train/images/" in _error(tmp_path)
    (tmp_path / "train" / "images").mkdir(parents=True)
    assert "missing train/masks/" in _error(tmp_path)


def test_empty_split(tmp_path):
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "masks").mkdir(parents=True)
    (tmp_path / "val" / "images" / "notes.txt").write_text("not an image")
    assert "no image/mask pairs" in _error(tmp_path, "val")


def test_image_without_mask_names_one_and_counts(tree):
    _write_pair(tree, "train", "z1")
    _write_pair(tree, "train", "z2")
    (tree / "train" / "masks" / "z1.png").unlink()
    (tree / "train" / "masks" / "z2.png").unlink()
    message = _error(tree)
    assert "z1.png has no mask" in message and "2 image(s)" in message
    Image.fromarray(_mask(24, 16)).save(tree / "train" / "masks" / "z1.jpg")
    assert "found z1.jpg" in _error(tree)


def test_mask_without_image_names_it(tree):
    (tree / "train" / "images" / "b.jpg").unlink()
    message = _error(tree)
    assert "b.png has no image" in message and "1 mask(s)" in message


def test_size_mismatch_gives_both_sizes(tree):
    Image.fromarray(_mask(20, 16), mode="L").save(tree / "train" / "masks" / "b.png")
    message = _error(tree)
    assert "b.png" in message and "20×16" in message and "24×16" in message


def test_class_index_out_of_range(tree):
    m = _mask(24, 16)
    m[3, 3] = 7
    Image.fromarray(m, mode="L").save(tree / "train" / "masks" / "a.png")
    message = _error(tree)
    assert "a.png" in message and "7" in message and "data.num_classes = 4" in message
    assert len(scan_split(tree, "train", 8)) == 3  # with enough classes the same tree is fine


def test_rgb_mask_is_refused(tree):
    Image.fromarray(_mask(24, 16)).convert("RGB").save(tree / "train" / "masks" / "a.png")
    message = _error(tree)
    assert "a.png" in message and "'RGB'" in message and "single-channel" in message


@pytest.mark.parametrize("which", ["masks/b.png", "images/b.jpg"])
def test_corrupt_files(tree, which):
    path = tree / "train" / which
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage" if which.endswith(".png") else b"not a jpeg at all")
    message = _error(tree)
    assert path.name in message and "cannot read" in message


def test_truncated_mask_is_found_at_scan_and_image_at_load(tree):
    mask_path = tree / "train" / "masks" / "c.png"
    mask_path.write_bytes(mask_path.read_bytes()[:60])
    assert "c.png" in _error(tree)

    # A truncated image passes the header-only scan; loading it names the file.
    image_path = tree / "val" / "images" / "v.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(image_path)
    pairs = scan_split(tree, "val", C)
    image_path.write_bytes(image_path.read_bytes()[:-300])
    with pytest.raises(DataError, match="v.png"):
        MaskFolderDataset(pairs, 16, MEAN, STD, augment=False)[0]


def test_bad_num_classes_is_a_config_error(tree):
    with pytest.raises(ConfigError, match="data.num_classes"):
        scan_split(tree, "train", 0)
