"""Tests for `pipeline.evaluate`: accuracy, params, MACs, size and the per-artifact measurement."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from export.runtimes import TorchRuntime
from pipeline.bench import LATENCY_KEYS
from pipeline.config import BenchConfig
from pipeline.evaluate import (
    artifact_size,
    count_macs,
    count_params,
    evaluate_module,
    evaluate_runtime,
    measure,
)
from pipeline.tasks import get_task

TASK = get_task("classification")

NUM_CLASSES = 4
SHAPE = (3, 8, 8)
FAST_BENCH = BenchConfig(warmup=0, runs=3, batch_runs=1, threads=1)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _encoded_loader(n: int = 10, batch_size: int = 3) -> DataLoader:
    """Images carry their own label in pixel [0, 0, 0] and their index in pixel [0, 0, 1]."""
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.zeros(n, *SHAPE)
    images[:, 0, 0, 0] = labels.float()
    images[:, 0, 0, 1] = torch.arange(n).float()
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


class HalfRightRuntime:
    """Predicts the true label for even-index images and a wrong one for odd-index images."""

    name = "fake"
    device = "cpu"
    threads = 1
    output_names = ("logits",)

    def prepare(self, batch):
        return batch

    def infer(self, prepared):
        return prepared

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        label = batch[:, 0, 0, 0].astype(int)
        index = batch[:, 0, 0, 1].astype(int)
        pred = np.where(index % 2 == 0, label, (label + 1) % NUM_CLASSES)
        return {"logits": np.eye(NUM_CLASSES, dtype=np.float32)[pred]}


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, NUM_CLASSES),
    )


# --- accuracy --------------------------------------------------------------------------------


def test_evaluator_sees_every_batch_in_order():
    seen = []

    class Recorder:
        def update(self, outputs, targets):
            seen.append((outputs["logits"].shape, targets.tolist()))

        def compute(self):
            return {"accuracy": 1.0}

    class RecordingTask(type(TASK)):
        def evaluator(self, num_classes):
            return Recorder()

    evaluate_runtime(HalfRightRuntime(), _encoded_loader(n=10, batch_size=3), RecordingTask(), NUM_CLASSES)

    assert [shape for shape, _ in seen] == [(3, NUM_CLASSES)] * 3 + [(1, NUM_CLASSES)]
    assert sum((labels for _, labels in seen), []) == (np.arange(10) % NUM_CLASSES).tolist()


def test_accuracy_known_half():
    acc = evaluate_runtime(HalfRightRuntime(), _encoded_loader(n=10, batch_size=3), TASK, NUM_CLASSES)

    assert acc == {"accuracy": pytest.approx(0.5)}


def test_accuracy_empty_loader_is_an_error():
    empty = DataLoader(TensorDataset(torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long)), batch_size=2)

    with pytest.raises(ValueError):
        evaluate_runtime(HalfRightRuntime(), empty, TASK, NUM_CLASSES)


class _ModeRecorder(nn.Module):
    """Returns its input's first NUM_CLASSES pixels as logits and records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(NUM_CLASSES)
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return x.flatten(1)[:, :NUM_CLASSES]


def test_evaluate_module_uses_eval_and_restores_modes():
    labels = torch.arange(6) % NUM_CLASSES
    images = torch.zeros(6, 1, 1, NUM_CLASSES)
    images[torch.arange(6), 0, 0, labels] = 1.0  # one-hot: a perfect "model" of the labels
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    model = _ModeRecorder()
    model.train()
    model.bn.eval()  # e.g. a frozen BatchNorm inside a training model

    acc = evaluate_module(model, loader, "cpu", TASK, NUM_CLASSES)["accuracy"]

    assert acc == pytest.approx(1.0)
    assert model.seen_training == [False, False]
    assert model.training is True and model.bn.training is False


# --- params and MACs -------------------------------------------------------------------------


def test_count_params_hand_computed():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),  # 3*4*9 = 108
        nn.BatchNorm2d(4),  # 4 + 4 = 8
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),  # 40 + 10 = 50
    )

    assert count_params(model) == 166


@pytest.mark.parametrize("backend", ["torch_pruning", "flop_counter"])
def test_count_macs_conv_and_linear_hand_computed(backend, monkeypatch):
    if backend == "flop_counter":
        monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import now raises ImportError
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 5, bias=False))

    conv_macs = count_macs(conv, (3, 16, 16))
    linear_macs = count_macs(linear, (1, 4, 4))

    assert conv_macs == 3 * 8 * 3 * 3 * 16 * 16  # C_in * C_out * k*k * H_out*W_out
    assert linear_macs == 16 * 5


@pytest.mark.parametrize("backend", ["torch_pruning", "flop_counter"])
def test_count_macs_leaves_model_unchanged(backend, monkeypatch):
    if backend == "flop_counter":
        monkeypatch.setitem(sys.modules, "torch_pruning", None)
    model = _tiny_cnn()
    model.train()  # BatchNorm in train mode would update its running stats on the zero input
    model[3].eval()  # one submodule deliberately in eval: modes are restored per module
    before = {k: v.clone() for k, v in model.state_dict().items()}

    macs = count_macs(model, SHAPE)

    assert macs > 0
    assert model.training is True and model[1].training is True and model[3].training is False
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # e.g. BatchNorm running stats untouched
    assert all(p.device.type == "cpu" for p in model.parameters())


# --- size and measure ------------------------------------------------------------------------


def test_artifact_size_openvino_xml_sums_bin_and_directory(tmp_path):
    xml = tmp_path / "model.xml"
    xml.write_bytes(b"x" * 100)
    (tmp_path / "model.bin").write_bytes(b"b" * 250)
    folder = tmp_path / "engine_dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "a").write_bytes(b"1" * 7)
    (folder / "sub" / "b").write_bytes(b"2" * 5)

    assert artifact_size(xml) == 350
    assert artifact_size(folder) == 12
    with pytest.raises(FileNotFoundError):
        artifact_size(tmp_path / "missing.onnx")


def test_measure_torch_artifact_all_keys(tmp_path):
    model = _tiny_cnn()
    path = tmp_path / "student.pt"
    torch.save(model.state_dict(), path)
    rt = TorchRuntime(model, threads=1)
    loader = _encoded_loader(n=8, batch_size=4)

    metrics = measure(
        rt, val_loader=loader, input_shape=SHAPE, batch_size=4, bench=FAST_BENCH, model=model, artifact_path=path,
        task=TASK, num_classes=NUM_CLASSES,
    )

    assert set(metrics) == {"accuracy", "params", "macs", "size_bytes", *LATENCY_KEYS}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["params"] == count_params(model)
    assert metrics["macs"] == count_macs(model, SHAPE) > 0
    assert metrics["size_bytes"] == path.stat().st_size
    assert metrics["threads"] == 1 and metrics["batch_size"] == 4


def test_measure_xml_artifact_without_model(tmp_path):
    xml = tmp_path / "openvino_fp32.xml"
    xml.write_bytes(b"<net/>" * 10)
    (tmp_path / "openvino_fp32.bin").write_bytes(b"\0" * 1000)

    metrics = measure(
        HalfRightRuntime(),
        task=TASK,
        num_classes=NUM_CLASSES,
        val_loader=_encoded_loader(n=10, batch_size=5),
        input_shape=SHAPE,
        batch_size=2,
        bench=FAST_BENCH,
        artifact_path=xml,
    )

    assert set(metrics) == {"accuracy", "size_bytes", *LATENCY_KEYS}
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["size_bytes"] == 60 + 1000
