"""Shared fixtures: a tiny config on real data (digits at 8 px, a fraction of the training
split, one epoch), a tiny model, and helpers to run the CLI."""

from __future__ import annotations

import os

# Under pytest-xdist each worker, and every run it starts, computes on one thread: two workers
# with torch's default (a thread per core) would fight over the same cores. Set before torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

TINY_TOML = """
[pipeline]
name = "tiny"
workdir = "run"
seed = 0
device = "cpu"

[data]
source = "digits"
image_size = 8
batch_size = 32
train_fraction = 0.25
calibration_size = 32

[teacher]
arch = "resnet18"
epochs = 1
lr = 0.05

[distill]
student = "resnet18"
epochs = 1

[bench]
warmup = 1
runs = 3
batch_runs = 1
threads = 1
"""


def merge_toml(text: str) -> str:
    """Merge repeated [tables] of a simple TOML text: later keys override earlier ones."""
    tables: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            current = s
            tables.setdefault(current, [])
        elif s and not s.startswith("#"):
            key = s.split("=")[0].strip()
            tables.setdefault(current, [])
            tables[current] = [kv for kv in tables[current] if kv.split("=")[0].strip() != key] + [s]
    return "\n".join(f"{t}\n" + "\n".join(kvs) for t, kvs in tables.items()) + "\n"


def tiny_cfg(workdir: Path, extra: str = ""):
    """The tiny config (plus `extra`, merged table by table) loaded in memory, its workdir `workdir`."""
    import tomllib

    from pipeline import config

    raw = tomllib.loads(merge_toml(TINY_TOML + "\n" + extra))
    raw["pipeline"]["workdir"] = str(workdir)
    return config.from_dict(raw, base_dir=workdir.parent)


def tiny_data(tmp_path_factory):
    """The tiny config's digits (load once per module, from a module-scoped fixture)."""
    from pipeline.tasks.classification.data import load_data

    cfg = tiny_cfg(tmp_path_factory.mktemp("cfg") / "run")
    return load_data(cfg.data, cfg.pipeline.seed)


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Factory: write a tiny pipeline.toml (plus `extra` TOML appended) and return its path."""

    def make(extra: str = "", text: str | None = None, name: str = "pipeline.toml") -> Path:
        """`extra` overrides keys of the tiny config table by table; `text` is written verbatim."""
        path = tmp_path / name
        path.write_text(text if text is not None else merge_toml(TINY_TOML + "\n" + textwrap.dedent(extra)))
        return path

    return make


@pytest.fixture
def tiny_model() -> nn.Module:
    """A 2-conv CNN for 3×8×8 inputs and 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ...` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
        env={**__import__("os").environ, "COLUMNS": "200", "PYTHONFAULTHANDLER": "1"},  # a native crash shows where
    )


@pytest.fixture
def cli():
    return run_cli
