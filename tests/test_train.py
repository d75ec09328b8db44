"""The shared training loop: an interrupted run resumes at the last finished epoch and ends
with exactly the weights of an uninterrupted run; NaN stops with epoch and batch."""

from __future__ import annotations

import copy
import re
from datetime import datetime

import pytest
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import OptimConfig
from pipeline.tasks import get_task
from pipeline.ui import clock_after, format_duration
from stages import training
from stages.training import TrainingError

# The classification task's loss and accuracy; its evaluator does not use the class count.
fit = partial(training.fit, task=get_task("classification"), num_classes=0)


def _loaders(seed=0):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(96, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    return train, val


OPT = OptimConfig(epochs=3, lr=0.05, warmup_epochs=1)


class Interrupt(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path, tiny_model):
    initial = copy.deepcopy(tiny_model.state_dict())
    # Uninterrupted reference.
    ref = copy.deepcopy(tiny_model)
    train, val = _loaders()
    torch.manual_seed(0)
    fit(ref, train_loader=train, val_loader=val, optim=OPT, device=torch.device("cpu"),
        checkpoint=tmp_path / "ref.pt", key="k", desc="ref")

    # Interrupted during epoch 3, then resumed by a fresh process-like setup.
    model = copy.deepcopy(tiny_model)
    model.load_state_dict(initial)
    train, val = _loaders()
    calls = {"n": 0}

    def crashing_loss(m, images, labels):
        calls["n"] += 1
        if calls["n"] > 2 * len(train) + 1:  # a batch into epoch 3
            raise Interrupt
        logits = m(images)
        return F.cross_entropy(logits, labels), logits, {}

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        fit(model, train_loader=train, val_loader=val, optim=OPT, device=torch.device("cpu"),
            checkpoint=tmp_path / "ckpt.pt", key="k", desc="crash", loss_fn=crashing_loss, checkpoint_every=0)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 2

    resumed = copy.deepcopy(tiny_model)
    resumed.load_state_dict(initial)
    train, val = _loaders()
    torch.manual_seed(999)  # resume must restore RNG state from the checkpoint, not rely on this
    history = fit(resumed, train_loader=train, val_loader=val, optim=OPT, device=torch.device("cpu"),
                  checkpoint=tmp_path / "ckpt.pt", key="k", desc="resume")
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3]
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_checkpoint_of_another_key_is_ignored(tmp_path, tiny_model):
    train, val = _loaders()
    one = OptimConfig(epochs=1, lr=0.01, warmup_epochs=0)
    fit(tiny_model, train_loader=train, val_loader=val, optim=one, device=torch.device("cpu"),
        checkpoint=tmp_path / "c.pt", key="old", desc="a")
    h = fit(tiny_model, train_loader=train, val_loader=val, optim=one, device=torch.device("cpu"),
            checkpoint=tmp_path / "c.pt", key="new", desc="b")
    assert len(h.epochs) == 1 and torch.load(tmp_path / "c.pt", weights_only=True)["key"] == "new"


def test_truncated_checkpoint_restarts_training(tmp_path, tiny_model):
    (tmp_path / "c.pt").write_bytes(b"PK\x03\x04 truncated")
    train, val = _loaders()
    h = fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=1, warmup_epochs=0),
            device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", key="k", desc="t")
    assert len(h.epochs) == 1


def test_nan_loss_names_epoch_and_batch_and_keeps_checkpoint(tmp_path, tiny_model):
    train, val = _loaders()
    fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=1, warmup_epochs=0),
        device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", key="k", desc="t")
    good = (tmp_path / "c.pt").read_bytes()
    n = {"i": 0}

    def nan_loss(m, images, labels):
        n["i"] += 1
        logits = m(images)
        loss = F.cross_entropy(logits, labels)
        return (loss * float("nan") if n["i"] == 3 else loss), logits, {}

    with pytest.raises(TrainingError, match=r"epoch 2 batch 3.*learning rate"):
        fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=2, warmup_epochs=0),
            device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", key="k", desc="t", loss_fn=nan_loss)
    assert (tmp_path / "c.pt").read_bytes() == good


def test_training_learns(tmp_path, tiny_model):
    train, val = _loaders()
    h = fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=8, lr=0.05, warmup_epochs=0),
            device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", key="k", desc="t")
    assert h.epochs[-1]["loss"] < h.epochs[0]["loss"]


def test_resume_restores_mgd_blocks_and_random_masks(tmp_path, tiny_model):
    """The MGD blocks (`extra`) and the RNG behind the random masks are checkpointed too."""
    from stages.mgd import FeatureTap, MGDLoss

    def run(model, head, ckpt, crash_after=None):
        torch.manual_seed(0)
        teacher = copy.deepcopy(tiny_model).eval()
        s_tap, t_tap = FeatureTap(model, ["3"], role="student"), FeatureTap(teacher, ["3"], role="teacher")
        calls = {"n": 0}

        def loss_fn(m, x, y):
            calls["n"] += 1
            if crash_after is not None and calls["n"] > crash_after:
                raise Interrupt
            logits = m(x)
            with torch.no_grad():
                teacher(x)
            return F.cross_entropy(logits, y) + head(s_tap.take()[0], t_tap.take()[0]), logits, {}

        train, val = _loaders()
        try:
            fit(model, train_loader=train, val_loader=val, optim=OPT, device=torch.device("cpu"),
                checkpoint=ckpt, key="k", desc="mgd", loss_fn=loss_fn, extra=head)
        finally:
            s_tap.remove()
            t_tap.remove()

    torch.manual_seed(5)
    head0 = MGDLoss(8, 8, alpha=1e-2, mask_ratio=0.5)
    ref_model, ref_head = copy.deepcopy(tiny_model), copy.deepcopy(head0)
    run(ref_model, ref_head, tmp_path / "ref.pt")
    model, head = copy.deepcopy(tiny_model), copy.deepcopy(head0)
    with pytest.raises(Interrupt):
        run(model, head, tmp_path / "c.pt", crash_after=2 * 6 + 2)
    model, head = copy.deepcopy(tiny_model), copy.deepcopy(head0)  # a fresh process: initial weights
    run(model, head, tmp_path / "c.pt")
    for a, b in zip(list(ref_model.state_dict().values()) + list(ref_head.state_dict().values()),
                    list(model.state_dict().values()) + list(head.state_dict().values())):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def _fake_clock(monkeypatch, seconds_per_batch: float, start: float = 0.0):
    """Drive `training.clock` from the batches: a loss function that advances it per batch."""
    now = {"t": start}
    monkeypatch.setattr(training, "clock", lambda: now["t"])

    def slow_loss(m, images, labels):
        now["t"] += seconds_per_batch
        logits = m(images)
        return F.cross_entropy(logits, labels), logits, {}

    return slow_loss


def test_time_estimate_logged_after_the_first_epoch(tmp_path, tiny_model, monkeypatch, caplog):
    # A clock that advances 2 s per training batch: 6 batches → 12 s an epoch, whatever the machine.
    slow_loss = _fake_clock(monkeypatch, 2.0, start=1000.0)
    train, val = _loaders()
    with caplog.at_level("INFO", logger="stages.training"):
        fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=6, warmup_epochs=0),
            device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", key="k", desc="teacher tiny",
            loss_fn=slow_loss, then="the baseline student follows")
    lines = [r.getMessage() for r in caplog.records if "left for this model" in r.getMessage()]
    assert len(lines) == 1, lines  # once, after the first epoch
    assert re.fullmatch(r"teacher tiny: epoch 1/6 took 12\.0 s; about 1 min left for this model "
                        r"\(ETA (\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d)\); the baseline student follows", lines[0]), lines


def test_estimate_after_a_resume_counts_the_epochs_left(tmp_path, tiny_model, monkeypatch, caplog):
    train, val = _loaders()
    fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=3, warmup_epochs=0),
        device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", key="k", desc="t")
    slow_loss = _fake_clock(monkeypatch, 50.0)
    train, val = _loaders()
    with caplog.at_level("INFO", logger="stages.training"):  # resumes at epoch 4 of 5: 300 s, one epoch left
        fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=5, warmup_epochs=0),
            device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", key="k", desc="t", loss_fn=slow_loss)
    assert any("epoch 4/5 took 5 min; about 5 min left" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (42, "42 s"), (60, "1 min"), (150, "2 min 30 s"),
                                           (3900, "1 h 05 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_clock_after_gives_the_date_when_not_today():
    noon = datetime(2026, 3, 1, 12, 0)
    assert clock_after(65 * 60, now=noon) == "13:05"
    assert clock_after(13 * 3600, now=noon) == "2026-03-02 01:00"


def test_checkpoints_are_throttled_by_time_on_short_epochs(tmp_path, tiny_model, monkeypatch):
    # 12 s epochs, one save at most every 20 s: the first epoch, then whenever 20 s have passed, and the last.
    saved: list[int] = []
    real_save = training._save
    monkeypatch.setattr(training, "_save", lambda ckpt, key, epoch, *a: (saved.append(epoch), real_save(ckpt, key, epoch, *a)))
    slow_loss = _fake_clock(monkeypatch, 2.0)
    train, val = _loaders()
    fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=6, warmup_epochs=0),
        device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", key="k", desc="t", loss_fn=slow_loss,
        checkpoint_every=20.0)
    assert saved == [1, 3, 5, 6]
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 6


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 2), torch.float16),
                                               ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((8, 7), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_dtype_follows_compute_capability_not_bf16_emulation(monkeypatch, capability, dtype):
    # V100 (7.0), Xavier (7.2) and T4 (7.5) report bf16 as supported (emulated) but cuDNN has no
    # bf16 convolution there: fp16 with a grad scaler is the fast path.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert training._amp_dtype(torch.device("cuda", 0), True) == dtype
    assert training._amp_dtype(torch.device("cuda", 0), False) is None
    assert training._amp_dtype(torch.device("cpu"), True) is None


@pytest.mark.gpu
def test_training_on_cuda_uses_amp_and_channels_last(tmp_path, tiny_model, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda", 0)
    scalers, autocasts = [], []
    real_scaler, real_autocast = torch.amp.GradScaler, torch.autocast

    def scaler(*a, **k):
        scalers.append(a)
        return real_scaler(*a, **k)

    def autocast(*a, **k):
        autocasts.append(k.get("dtype") if k.get("enabled", True) else None)
        return real_autocast(*a, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    monkeypatch.setattr(torch, "autocast", autocast)
    train, val = _loaders()
    history = fit(tiny_model, train_loader=train, val_loader=val, optim=OptimConfig(epochs=2, lr=0.05, warmup_epochs=0),
                  device=device, checkpoint=tmp_path / "ckpt.pt", key="k", desc="cuda")
    expected = torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    assert set(autocasts) == {expected}
    assert len(scalers) == (1 if expected == torch.float16 else 0)  # fp16 needs the grad scaler
    assert all(e["loss"] == e["loss"] for e in history.epochs)  # finite (not NaN)
    conv = tiny_model[0].weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state  # the resume checkpoint of a CUDA run loads without unpickling code
