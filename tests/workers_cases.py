"""Training loaders with worker processes (`[data] num_workers`), on a tiny ImageFolder.

Not collected on its own (no ``test_`` prefix): `tests/test_workers.py` runs it in a fresh
pytest process. Forking DataLoader workers inside the suite's long-lived process crashed it
(SIGSEGV, exit -11): forked after OpenVINO, ONNX Runtime and hundreds of models had run there,
or followed by a test that started a subprocess. Each test passes alone, and a pipeline run
(one process) with workers never crashed.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.tasks.classification.data import load_data
from tests.test_data import S, folder_cfg, make_tree


def test_training_loaders_feed_a_step_from_a_worker_process(tmp_path):
    import time

    from pipeline.config import from_dict
    from pipeline.stage import StageContext
    from stages.training import loaders

    root = make_tree(tmp_path / "ds", n=3)
    cfg = from_dict({"data": {"source": "imagefolder", "root": str(root), "image_size": S, "batch_size": 4,
                              "num_workers": 1}, "pipeline": {"workdir": str(tmp_path / "run")}}, tmp_path)
    ctx = StageContext(cfg=cfg, name="teacher", workdir=tmp_path, inputs={}, device=torch.device("cpu"), key="k",
                       _data=load_data(cfg.data, seed=0, base_dir=tmp_path))
    train, val = loaders(ctx)
    assert train.num_workers == val.num_workers == 1 and not train.pin_memory
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t0 = time.perf_counter()
    images, labels = next(iter(train))  # decoded and augmented in the worker
    started = time.perf_counter() - t0
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    opt.step()
    assert images.shape == (4, 3, S, S) and torch.isfinite(loss)
    assert started < 10, f"a worker took {started:.1f} s to deliver its first batch"


def test_a_resumed_epoch_draws_the_same_batches_from_workers(tmp_path):
    # What a checkpoint restores (the loader's generator, torch's RNG) must give the next epoch's
    # crops and order exactly, as for an uninterrupted run: true of workers restarted per epoch.
    from pipeline.config import from_dict
    from pipeline.stage import StageContext
    from stages.training import loaders

    root = make_tree(tmp_path / "ds", n=3)
    cfg = from_dict({"data": {"source": "imagefolder", "root": str(root), "image_size": S, "batch_size": 4,
                              "num_workers": 1}, "pipeline": {"workdir": str(tmp_path / "run")}}, tmp_path)
    data = load_data(cfg.data, seed=0, base_dir=tmp_path)
    ctx = StageContext(cfg=cfg, name="teacher", workdir=tmp_path, inputs={}, device=torch.device("cpu"), key="k",
                       _data=data)
    torch.manual_seed(0)
    first, _ = loaders(ctx)
    list(first)  # epoch 0
    state, rng = first.generator.get_state(), torch.get_rng_state()
    epoch1 = [x for x, _ in first]
    resumed, _ = loaders(ctx)
    resumed.generator.set_state(state)
    torch.set_rng_state(rng)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, [x for x, _ in resumed], strict=True))


def test_an_unreadable_image_met_in_a_worker_is_still_one_line(tmp_path):
    root = make_tree(tmp_path / "ds", n=2)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    bundle = load_data(folder_cfg(root), seed=0)
    with pytest.raises(ConfigError) as exc:
        for _ in bundle.loader("train", 8, num_workers=1):
            pass
    msg = str(exc.value)
    assert "cannot read image" in msg and "broken.png" in msg and "\n" not in msg and "Traceback" not in msg, msg

