"""A task is one package: a fake task written to a temporary folder, outside the project, runs a
tiny chain (teacher → MGD distillation → ONNX) through the CLI with no other file touched, as
docs/architecture.md's "Adding a task" says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The whole task: seeded noise images whose label is whether their mean is above zero; a tiny
# conv net; its own metric ("hit_rate") with its own label. Everything the contract asks for.
TASK_SOURCE = '''
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pipeline.data import DataBundle
from pipeline.tasks.base import Metric, Source, Task


class Noise(Dataset):
    def __init__(self, n, size, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g) + torch.randn(n, 1, 1, 1, generator=g)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Net(nn.Module):
    def __init__(self, width, classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


class HitRate:
    def __init__(self):
        self.hit = self.n = 0

    def update(self, outputs, targets):
        pred = np.asarray(outputs["logits"]).argmax(1)
        self.hit += int((pred == np.asarray(targets)).sum())
        self.n += len(pred)

    def compute(self):
        return {"hit_rate": self.hit / self.n}


class SignOfTheMean(Task):
    name = "sign_of_the_mean"
    quality = (Metric("hit_rate", "hit rate"),)
    history_metric = "hit_rate"
    agreement = "label_agreement"
    output_names = ("logits",)
    sources = (Source("noise", about="seeded noise"),)
    default_pair = ("wide", "narrow")
    mgd_defaults = {"alpha": "auto", "mask_ratio": 0.5, "mask": "pixel"}
    recipe = {"optim": {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0, "warmup_epochs": 0}, "batch_size": 16}

    def check_data(self, cfg, base_dir):
        pass

    def load_data(self, cfg, seed, base_dir):
        s = cfg.image_size
        train, val = Noise(64, s, seed), Noise(32, s, seed + 1)
        return DataBundle(train=train, val=val, calibration=Noise(16, s, seed + 2), classes=["below", "above"],
                          image_size=s, in_memory=True)

    def unlabeled_transform(self, cfg):
        raise NotImplementedError("no image files for this task")

    def check_arch(self, arch):
        from pipeline.errors import ConfigError

        if arch not in ("wide", "narrow"):
            raise ConfigError(f"arch = {arch!r}: allowed wide, narrow")

    def build_model(self, arch, num_classes, *, image_size, weights="", base_dir=None):
        return Net(16 if arch == "wide" else 8, num_classes)

    def default_layers(self, arch):
        return ["features"]

    def prune_keep(self, model):
        return ["fc"]

    def loss(self, out, targets, cfg):
        return F.cross_entropy(out, targets)

    def kd_loss(self, student_out, teacher_out, cfg):
        return F.kl_div(F.log_softmax(student_out, 1), F.softmax(teacher_out, 1), reduction="batchmean")

    def evaluator(self, num_classes):
        return HitRate()

    def postprocess(self, outputs):
        return np.asarray(outputs["logits"]).argmax(1)


TASK = SignOfTheMean()
'''

CONFIG = """
[pipeline]
name = "plugin"
workdir = "run"
task = "sign_of_the_mean"

[data]
image_size = 8
calibration_size = 16

[teacher]
epochs = 2

[distill]
epochs = 1

[onnx]
int8 = false
export_teacher = false

[openvino]
enabled = false

[tensorrt]
enabled = false

[bench]
warmup = 1
runs = 3
batch_runs = 1
threads = 1
"""


@pytest.mark.slow
def test_a_task_package_outside_the_project_runs_a_tiny_chain(tmp_path):
    package = tmp_path / "plugins" / "sign_of_the_mean"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(TASK_SOURCE))
    cfg = tmp_path / "plugin.toml"
    cfg.write_text(CONFIG)
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), str(ROOT)]), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)

    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["pipeline"]["task"]["name"] == "sign_of_the_mean"
    assert manifest["pipeline"]["task"]["labels"] == {"hit_rate": "hit rate"}
    assert manifest["pipeline"]["config"]["teacher"]["arch"] == "wide"  # the task's default pair
    assert manifest["pipeline"]["config"]["distill"]["student"] == "narrow"
    assert manifest["pipeline"]["config"]["data"]["source"] == "noise"
    assert manifest["metric_units"]["hit_rate"] == {"unit": "fraction", "better": "higher"}
    assert [s for s, r in manifest["stages"].items() if r["status"] == "ok"] == ["teacher", "distill", "onnx"]
    for stage, artifact in (("teacher", "teacher"), ("distill", "student"), ("distill", "student_baseline"),
                            ("onnx", "onnx")):
        assert 0.0 <= manifest["stages"][stage]["metrics"][artifact]["hit_rate"] <= 1.0, (stage, artifact)
    (tap,) = manifest["stages"]["distill"]["metrics"]["student"]["mgd_taps"]  # trained with MGD, on the task's tap
    assert tap["student"] == tap["teacher"] == "features"
    assert "hit rate" in (tmp_path / "run" / "report.md").read_text()
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before, "the run touched files of the project"
