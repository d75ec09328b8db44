"""benchmarks/gpu_check.py, the prepared check of the CUDA path, on a machine without a GPU:
the config it generates, how it reads a run's manifest, and that it fails clearly without CUDA.
(Its real run needs an NVIDIA GPU: `./noxw -s gpu_check`.)"""

from __future__ import annotations

import importlib.util
import json
import sys
import tomllib
from pathlib import Path

import torch

from pipeline import config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up there
_spec.loader.exec_module(gpu_check)


def test_generated_config_runs_the_demo_on_cuda_in_the_workdir(tmp_path):
    path = gpu_check._config(ROOT / "configs" / "imagefolder.toml", tmp_path / "runs" / "single", True, "single")
    raw = tomllib.loads(path.read_text())
    assert raw["pipeline"]["device"] == "cuda" and raw["pipeline"]["workdir"] == str(tmp_path / "runs" / "single")
    assert raw["teacher"]["epochs"] == 2 and raw["distill"]["epochs"] == 3 and raw["prune"]["heal_epochs"] == 1
    # A relative data root stays the one the original config meant.
    assert Path(raw["data"]["root"]).is_absolute() and Path(raw["data"]["root"]).parent == (ROOT / "data").resolve()
    raw["pipeline"]["device"] = "cpu"  # this machine has no CUDA; the rest must be a valid config
    cfg = config.from_dict(raw, path.parent)
    assert cfg.workdir == tmp_path / "runs" / "single"
    demo = tomllib.loads(gpu_check._config(ROOT / "pipeline.toml", tmp_path / "d", False, "d").read_text())
    assert demo["teacher"]["epochs"] == tomllib.loads((ROOT / "pipeline.toml").read_text())["teacher"]["epochs"]


def test_manifest_lines_print_each_build_and_why_the_engine_is_missing(tmp_path):
    stages = {"tensorrt": {"status": "ok", "seconds": 12.5, "device": "cuda:0", "metrics": {
        "trt_qdq": {"accuracy": 0.95, "latency_p50_ms": 0.8, "latency_p90_ms": 0.9, "batch_size": 1,
                    "batch_fixed": True, "throughput_ips": 1250.0}},
        "unavailable": {"trt_engine": "engine build failed: TensorRT failed: ..."}}}
    (tmp_path / "manifest.json").write_text(json.dumps({"pipeline": {"task": {"metric": "accuracy"}}, "stages": stages}))
    lines, manifest = gpu_check._manifest_lines(tmp_path)
    assert lines[0] == "stage tensorrt: ok in 12.5 s on cuda:0"
    assert "accuracy 0.9500" in lines[1] and "p50 0.800 ms" in lines[1] and "batch 1 (fixed): 1,250 img/s" in lines[1]
    assert lines[2].split() == ["trt_engine", "not", "built:", "engine", "build", "failed:", "TensorRT", "failed:", "..."]
    assert gpu_check._manifest_lines(tmp_path / "none")[0] == ["no manifest.json was written"]


def test_without_cuda_it_fails_the_environment_step_and_skips_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--workdir", str(tmp_path)])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    assert "[FAILED] environment" in out and "torch.cuda.is_available() is False" in out
    assert out.count("[skipped]") == 3 and "0 ok, 3 skipped, 1 FAILED: environment" in out
    assert not any(tmp_path.iterdir())  # nothing ran
