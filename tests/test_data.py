"""Tests for pipeline.data: digits splits, ImageFolder trees, torchvision errors (all offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data as data_mod
from pipeline.config import ConfigError, DataConfig, ScenesConfig
from pipeline.data import DataBundle
from pipeline.tasks.classification.data import check_data, eval_transform, load_data, train_transform

S = 16


def digits_cfg(**kw) -> DataConfig:
    return DataConfig(source="digits", image_size=S, **kw)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(digits_cfg(calibration_size=64), seed=0)


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_and_classes(digits):
    x, y = digits.train[0]

    assert x.shape == (3, S, S) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    assert digits.classes == [str(i) for i in range(10)]
    assert digits.num_classes == 10
    assert digits.input_shape == (3, S, S)


def test_digits_normalisation_matches_raw_mean(digits):
    from sklearn.datasets import load_digits

    cfg = digits_cfg()
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)

    xs = torch.stack([digits.val[i][0] for i in range(len(digits.val))])
    raw = xs * std + mean  # undo the normalisation

    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    expected = load_digits().images.mean() / 16.0
    assert raw.mean().item() == pytest.approx(expected, abs=0.02)
    # the normalised values are not the raw ones
    assert xs.mean().item() < 0


def test_digits_split_sizes_and_disjoint(digits):
    n_train, n_val = len(digits.train), len(digits.val)

    assert n_train + n_val == 1797
    assert n_val == pytest.approx(0.2 * 1797, abs=2)
    assert len(digits.calibration) == 64
    val_idx = set(digits.val.indices.tolist())
    assert not val_idx & set(digits.train.indices.tolist())
    assert not val_idx & set(digits.calibration.indices.tolist())
    assert set(digits.calibration.indices.tolist()) <= set(digits.train.indices.tolist())


def test_digits_split_stratified(digits):
    counts = np.bincount(digits.val.targets, minlength=10)

    assert counts.min() >= 30  # ~36 per class with 20 % held out


def test_digits_calibration_uses_eval_transform():
    bundle = load_data(digits_cfg(augment=True, calibration_size=8), seed=0)
    j = int(bundle.calibration.indices[0])
    pos = int(np.where(bundle.train.indices == j)[0][0])

    torch.manual_seed(0)
    a = bundle.calibration[0][0]
    b = bundle.calibration[0][0]

    assert torch.equal(a, b)  # no augmentation on calibration
    torch.manual_seed(1)
    shifted = [bundle.train[pos][0] for _ in range(8)]
    assert any(not torch.equal(a, t) for t in shifted)  # train is augmented


def test_digits_reproducible_by_seed_and_different_across_seeds():
    a = load_data(digits_cfg(), seed=3)
    b = load_data(digits_cfg(), seed=3)
    c = load_data(digits_cfg(), seed=4)

    assert np.array_equal(a.val.indices, b.val.indices)
    assert np.array_equal(a.calibration.indices, b.calibration.indices)
    assert not np.array_equal(a.val.indices, c.val.indices)


def test_digits_train_fraction_shrinks_train_not_val():
    full = load_data(digits_cfg(), seed=0)
    small = load_data(digits_cfg(train_fraction=0.25, calibration_size=10_000), seed=0)

    assert len(small.train) == pytest.approx(0.25 * len(full.train), abs=2)
    assert np.array_equal(small.val.indices, full.val.indices)
    assert set(small.train.indices.tolist()) <= set(full.train.indices.tolist())
    assert len(small.calibration) == len(small.train)  # min(calibration_size, len(train))
    assert len(set(small.train.targets)) == 10  # stratified: every class kept


def test_students_train_share_is_seeded_stratified_and_leaves_val_alone(digits):
    a, b, other = (digits.with_train_share(0.15, seed) for seed in (0, 0, 1))
    assert a.train.indices == b.train.indices  # the baseline and the distilled student: the same images
    assert a.train.indices != other.train.indices
    assert len(a.train) == pytest.approx(0.15 * len(digits.train), abs=2)
    assert set(a.train.indices) <= set(range(len(digits.train)))
    assert len({digits.train.targets[i] for i in a.train.indices}) == 10  # stratified: every class kept
    assert a.val is digits.val and a.calibration is digits.calibration
    assert digits.with_train_share(1.0, 0) is digits


def test_loader_shuffle_reproducible(digits):
    def first_labels(seed):
        return next(iter(digits.loader("train", 32, seed=seed)))[1]

    a, b, c = first_labels(7), first_labels(7), first_labels(8)
    val_batch = next(iter(digits.loader("val", 32)))[1]

    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert val_batch.tolist() == digits.val.targets[:32]  # val is not shuffled


def test_loader_with_sampler_and_unknown_split(digits):
    sampler = torch.utils.data.SequentialSampler(digits.val)

    batch = next(iter(digits.loader("val", 4, sampler=sampler)))

    assert batch[0].shape == (4, 3, S, S)
    with pytest.raises(ValueError, match="unknown split"):
        digits.loader("test", 4)


# ---------------------------------------------------------------------------- imagefolder


def make_tree(root: Path, classes=("cat", "dog", "fox"), n=4, splits=("train", "val")) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="imagefolder", root=str(root), image_size=S, **kw)


def test_imagefolder_loads(tmp_path):
    root = make_tree(tmp_path / "ds")
    # a grayscale image must come out as 3 channels
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(root / "val" / "cat" / "gray.png")

    bundle = load_data(folder_cfg(Path("ds"), calibration_size=5), seed=0, base_dir=tmp_path)

    assert bundle.classes == ["cat", "dog", "fox"]
    assert len(bundle.train) == 12 and len(bundle.val) == 13 and len(bundle.calibration) == 5
    x, y = bundle.val[0]
    assert x.shape == (3, S, S) and y == 0
    xb, yb = next(iter(bundle.loader("train", 6)))
    assert xb.shape == (6, 3, S, S) and yb.dtype == torch.int64
    assert all(bundle.calibration[i][0].shape == (3, S, S) for i in range(5))


def test_eval_and_train_transform_shapes():
    img = Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8))
    big = DataConfig(source="imagefolder", root="x", image_size=64)

    assert eval_transform(folder_cfg(Path("x")))(img).shape == (3, S, S)
    assert train_transform(folder_cfg(Path("x")))(img).shape == (3, S, S)
    assert eval_transform(big)(img).shape == (3, 64, 64)
    assert train_transform(big)(img).shape == (3, 64, 64)


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_data(folder_cfg(tmp_path / "nope"))


def test_imagefolder_missing_val(tmp_path):
    root = make_tree(tmp_path, splits=("train",))

    with pytest.raises(ConfigError, match="val/"):
        load_data(folder_cfg(root), seed=0)


def test_imagefolder_class_mismatch_names_class(tmp_path):
    root = make_tree(tmp_path)
    make_tree(tmp_path, classes=("owl",), splits=("train",))

    with pytest.raises(ConfigError, match="only in train/: owl"):
        check_data(folder_cfg(root))


def test_imagefolder_single_class(tmp_path):
    root = make_tree(tmp_path, classes=("cat",))

    with pytest.raises(ConfigError, match="at least 2"):
        check_data(folder_cfg(root))


def test_imagefolder_empty_class_folder(tmp_path):
    root = make_tree(tmp_path)
    (root / "val" / "emu").mkdir()
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("no images here")

    with pytest.raises(ConfigError, match="no images: emu"):
        check_data(folder_cfg(root))


def test_imagefolder_split_without_class_folders(tmp_path):
    root = make_tree(tmp_path, splits=("train",))
    (root / "val").mkdir()

    with pytest.raises(ConfigError, match="no class folders"):
        check_data(folder_cfg(root))


# ---------------------------------------------------------------------------- torchvision


def test_torchvision_unknown_name_suggests():
    cfg = DataConfig(source="torchvision", name="CIFAR1O", root="x")

    with pytest.raises(ConfigError, match="did you mean CIFAR10"):
        check_data(cfg)


def test_torchvision_missing_data_without_download(tmp_path):
    cfg = DataConfig(source="torchvision", name="CIFAR10", root=str(tmp_path), download=False)

    check_data(cfg)  # the root exists: the cheap check passes
    with pytest.raises(ConfigError, match="data.download = true"):
        load_data(cfg, seed=0)


def test_torchvision_missing_root_preflight(tmp_path):
    cfg = DataConfig(source="torchvision", name="MNIST", root="absent")

    with pytest.raises(ConfigError, match="data.download = true"):
        check_data(cfg, base_dir=tmp_path)


def test_a_development_split_replaces_val_with_held_out_training_images(tmp_path):
    from pipeline.data import load_bundle
    from pipeline.tasks import get_task

    task = get_task("classification")
    full = load_bundle(task, digits_cfg(calibration_size=64), 0, tmp_path)
    dev = load_bundle(task, digits_cfg(calibration_size=64, dev_fraction=0.2), 0, tmp_path)
    held, kept = dev.val.indices, dev.train.indices
    assert len(held) == round(0.2 * len(full.train)) and len(kept) + len(held) == len(full.train)
    assert not set(held) & set(kept) and not set(dev.calibration.indices) & set(held)
    assert len(dev.calibration) == 64
    # Seen as evaluation images: no augmentation, so an image is the same tensor every time.
    assert torch.equal(dev.val[0][0], dev.val[0][0])
    labels = np.array(dev.train.targets)
    assert np.bincount(labels, minlength=10).min() > 0  # stratified, and labels kept for a later share
    assert dev.with_train_share(0.5, 0).train.indices  # a share of the rest, still possible
    again = load_bundle(task, digits_cfg(calibration_size=64, dev_fraction=0.2), 0, tmp_path)
    assert again.val.indices == held  # seeded


# ---------------------------------------------------------------------------- loader workers


@pytest.mark.parametrize("cpus, ranks, expected", [(1, 1, 0), (2, 1, 1), (8, 1, 7), (32, 1, 8), (16, 2, 7), (2, 2, 0)])
def test_auto_workers_rule(monkeypatch, cpus, ranks, expected):
    monkeypatch.setattr(data_mod.os, "sched_getaffinity", lambda _pid: set(range(cpus)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert data_mod.available_cpus() == cpus
    assert data_mod.resolve_workers("auto", in_memory=False) == expected
    assert data_mod.resolve_workers("auto", in_memory=True) == 0  # in memory: never workers


def test_an_explicit_worker_count_wins(monkeypatch):
    monkeypatch.setattr(data_mod, "available_cpus", lambda: 16)
    assert data_mod.resolve_workers(3, in_memory=True) == 3
    assert data_mod.resolve_workers(0, in_memory=False) == 0
    assert DataConfig().num_workers == "auto"
    with pytest.raises(ValueError, match="'auto' or a number of worker processes"):
        DataConfig(num_workers=-1)


def test_in_memory_sources_get_no_workers_files_do(monkeypatch, digits, tmp_path):
    monkeypatch.setattr(data_mod, "available_cpus", lambda: 4)
    assert digits.in_memory and digits.workers("auto") == 0
    assert digits.with_train_share(0.5, seed=0).in_memory  # the students' share keeps the flag
    folder = load_data(folder_cfg(make_tree(tmp_path / "ds", n=2)), seed=0)
    assert not folder.in_memory and folder.workers("auto") == 3
    from pipeline.tasks import get_task

    small = {"image_size": 32, "scenes": ScenesConfig(train_images=4, val_images=2), "calibration_size": 2}
    for task in ("segmentation", "detection"):
        scenes = get_task(task).load_data(DataConfig(source="scenes", **small), seed=0, base_dir=tmp_path)
        assert scenes.in_memory and scenes.workers("auto") == 0, task
