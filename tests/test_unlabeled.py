"""`[distill] unlabeled`: the images, their checks, the stream beside the labelled batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from pipeline import config, unlabeled
from pipeline.errors import ConfigError
from pipeline.runner import Runner, RunOptions
from pipeline.tasks import get_task
from stages.unlabeled_stream import UnlabeledStream


def _images(folder, n=3, size=(12, 9)):
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b/deep")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(sub / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_a_folder_is_read_recursively_and_shaped_like_the_tasks_inputs(tmp_path):
    _images(tmp_path / "u", 3)
    (tmp_path / "u" / "notes.txt").write_text("not an image")
    cfg = config.from_dict({"data": {"image_size": 16}})
    for task, shape in (("classification", (3, 16, 16)), ("segmentation", (3, 16, 16)), ("detection", (3, 16, 16))):
        found = unlabeled.load("u", None, train_fraction=1.0, seed=0, base_dir=tmp_path,
                               transform=lambda: get_task(task).unlabeled_transform(cfg.data))
        assert found.count == 3 and tuple(found.dataset[0].shape) == shape
    again = unlabeled.load(str(tmp_path / "u"), None, train_fraction=1.0, seed=0, base_dir=tmp_path,
                           transform=lambda: get_task("classification").unlabeled_transform(cfg.data))
    assert again.sha256 == found.sha256 and again.record()["unlabeled_images"] == 3
    # Detection letterboxes: a 12×9 image keeps its aspect ratio, the padding is grey.
    x = unlabeled.load("u", None, train_fraction=1.0, seed=0, base_dir=tmp_path,
                       transform=lambda: get_task("detection").unlabeled_transform(cfg.data)).dataset[0]
    assert not torch.allclose(x[:, 0], x[:, 8])  # top rows are padding, the middle is the image


@pytest.mark.parametrize("make, spec, fraction, message", [
    (lambda root: None, "missing", 0.5, "distill.unlabeled: .*missing is not a folder"),
    (lambda root: (root / "empty").mkdir(), "empty", 0.5, "distill.unlabeled: no image files under .*empty"),
    (lambda root: ((root / "bad").mkdir(), (root / "bad" / "x.png").write_bytes(b"not a png")), "bad", 0.5,
     r"distill.unlabeled: cannot read image .*x\.png"),
    (lambda root: None, "rest", 1.0, r'distill.unlabeled = "rest" needs distill.train_fraction < 1'),
])
def test_bad_unlabeled_input_is_one_line_exit_2_before_anything_runs(tmp_path, tiny_config, make, spec, fraction,
                                                                      message):
    make(tmp_path)
    with pytest.raises(ConfigError, match=message):
        unlabeled.check(spec, fraction, tmp_path)
    # Through the runner: its preflight refuses before anything runs (the CLI's exit 2).
    cfg = config.load(tiny_config(extra=f"[distill]\nunlabeled = '{spec}'\ntrain_fraction = {fraction}\n"))
    with pytest.raises(ConfigError, match=message):
        Runner(cfg, RunOptions()).run()
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_the_stream_is_seeded_per_epoch_and_leaves_the_global_random_state_alone():
    data = TensorDataset(torch.arange(10.0).view(10, 1))
    # A transform that draws from the global generator, as in-memory augmentation does.
    noisy = type("Noisy", (torch.utils.data.Dataset,), {
        "__len__": lambda self: 10, "__getitem__": lambda self, i: data[i][0] + torch.rand(1)})()
    stream = UnlabeledStream(noisy, 4, seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    stream.start_epoch(0)
    first = [stream.next() for _ in range(5)]  # more than one pass: 10 images, 4 a batch, last dropped
    assert torch.equal(torch.get_rng_state(), before)
    assert all(b.shape == (4, 1) for b in first)
    again = UnlabeledStream(noisy, 4, seed=3)
    again.start_epoch(0)  # a resumed run: the same batches, augmentation draws included
    assert all(torch.equal(a, again.next()) for a in first)
    again.start_epoch(1)
    assert not torch.equal(first[0], again.next())


def test_rest_distils_on_the_left_out_images_and_records_them(tmp_path, tiny_config):
    cfg = config.load(tiny_config(extra="[teacher]\nepochs = 0\n[distill]\nunlabeled = 'rest'\n"
                                        "train_fraction = 0.5\nunlabeled_batch_size = 16\nepochs = 2\n"))
    out = Runner(cfg, RunOptions(until_stage="distill")).run()
    assert out.code == 0, out.messages
    rec = out.manifest.stages["distill"]
    m = rec.metrics["student"]
    assert m["unlabeled_source"] == "rest" and m["unlabeled_images"] > 0 and len(m["unlabeled_sha256"]) == 64
    assert "unlabeled_images" not in rec.metrics["student_baseline"]
    for epoch in rec.history["student"]:
        assert epoch["loss_mgd_unlabeled"] > 0
        assert epoch["loss"] == pytest.approx(epoch["loss_task"] + epoch["loss_mgd"] + epoch["loss_mgd_unlabeled"],
                                              rel=1e-4)
    assert all("loss_mgd_unlabeled" not in e for e in rec.history["student_baseline"])
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["distill"]["config"]
