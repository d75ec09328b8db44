"""DistributedDataParallel for real: 2 processes on the CPU with the gloo backend.

The ranks start from *different* random weights and see different shards of the data; after
training they must hold identical weights (DDP broadcast + gradient all-reduce for the model,
our broadcast + all-reduce for the MGD blocks). The same two ranks then run the tensorrt stage:
rank 0 alone calibrates and writes. Then the CLI itself under torchrun, and how a rank joins
the process group (backend from the configured device, timeout, device id).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from pipeline.config import OptimConfig
from pipeline.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    from pipeline.tasks import get_task
    from stages.training import fit
    from stages.mgd import FeatureTap, MGDLoss

    torch.manual_seed(100 + rank)  # deliberately different initial weights per rank
    model, head = _net(), MGDLoss(8, 8, alpha=1e-2)
    torch.save({"model": model.state_dict(), "extra": head.state_dict()}, f"{out_dir}/init{rank}.pt")
    torch.manual_seed(0)
    teacher = _net().eval()
    s_tap, t_tap = FeatureTap(model, ["2"], role="student"), FeatureTap(teacher, ["2"], role="teacher")

    def loss_fn(net, x, y):
        logits = net(x)
        with torch.no_grad():
            teacher(x)
        return F.cross_entropy(logits, y) + head(s_tap.take()[0], t_tap.take()[0]), logits, {}

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    train = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=True, seed=0),
                       generator=torch.Generator().manual_seed(0))
    fit(model, train_loader=train, val_loader=DataLoader(data, batch_size=16),
        optim=OptimConfig(epochs=2, lr=0.05, warmup_epochs=0), device=torch.device("cpu"),
        checkpoint=__import__("pathlib").Path(out_dir) / "ckpt.pt", key="k", desc=f"rank{rank}",
        task=get_task("classification"), num_classes=10, loss_fn=loss_fn, extra=head)
    torch.save({"model": model.state_dict(), "extra": head.state_dict()}, f"{out_dir}/rank{rank}.pt")
    _tensorrt_stage_on_this_rank(rank, out_dir)
    tdist.destroy_process_group()


def _tensorrt_stage_on_this_rank(rank: int, out_dir: str) -> None:
    """The tensorrt stage as each torchrun rank runs it, then the runner's barrier; what the rank
    did is written to trt{rank}.json."""
    from pathlib import Path

    from torch.utils.data import TensorDataset

    from export import tensorrt as trt_stage
    from pipeline import config, dist
    from pipeline.data import DataBundle
    from pipeline.stage import StageContext

    sys.modules["tensorrt"] = None  # as on a machine without TensorRT: no engine is attempted
    quantized = []
    real = trt_stage.quantize_calibrated
    trt_stage.quantize_calibrated = lambda *a, **kw: quantized.append(rank) or real(*a, **kw)
    workdir = Path(out_dir) / "run"
    cfg = config.from_dict({"pipeline": {"workdir": str(workdir), "device": "cpu"}, "bench": {"threads": 1},
                            "data": {"source": "digits", "image_size": 8, "batch_size": 32, "calibration_size": 32},
                            "tensorrt": {"calibration": "minmax"}})
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    data = DataBundle(train=images, val=images, calibration=images, classes=[str(i) for i in range(10)], image_size=8)
    ctx = StageContext(cfg=cfg, name="tensorrt", workdir=workdir, inputs={"onnx": workdir / "onnx" / "student.onnx"},
                       device=torch.device("cpu"), key="k", _data=data)
    result = trt_stage.run(ctx)
    dist.barrier()  # as the runner does before every rank hashes the outputs
    record = {"quantized": quantized, "outputs": {k: str(v) for k, v in result.outputs.items()},
              "exist": {k: Path(v).is_file() for k, v in result.outputs.items()}, "measure": sorted(result.measure),
              "unavailable": sorted(result.unavailable)}
    (Path(out_dir) / f"trt{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process gloo group (starting processes costs seconds) for the tests below: DDP
    training, then the tensorrt stage on an ONNX made here."""
    out = tmp_path_factory.mktemp("ranks")
    (out / "run" / "onnx").mkdir(parents=True)
    torch.manual_seed(0)
    torch.onnx.export(_net().eval(), torch.zeros(1, 3, 8, 8), str(out / "run" / "onnx" / "student.onnx"),
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


def test_ddp_two_ranks_end_identical(two_ranks):
    r0, r1 = (torch.load(two_ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    i0, i1 = (torch.load(two_ranks / f"init{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(i0["model"]["0.weight"], i1["model"]["0.weight"])  # ranks really started apart
    for part in ("model", "extra"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    assert not torch.equal(r0["model"]["0.weight"], i0["model"]["0.weight"])  # training happened
    assert (two_ranks / "ckpt.pt").exists()  # rank 0 checkpointed


def test_tensorrt_stage_runs_on_rank_0_only(two_ranks):
    """Rank 0 calibrates and writes; rank 1 returns the same output paths without touching
    them, so the ranks never race on the files (or on student.engine where one is built)."""
    r0, r1 = (json.loads((two_ranks / f"trt{r}.json").read_text()) for r in (0, 1))
    assert r0["quantized"] == [0] and r1["quantized"] == []
    assert r0["outputs"] == r1["outputs"] and set(r0["outputs"]) == {"trt_qdq", "trt_calib_cache"}
    assert all(r0["exist"].values()) and all(r1["exist"].values())  # after the barrier: rank 0's files
    assert r0["measure"] == ["trt_qdq"] and r1["measure"] == [] and r1["unavailable"] == []
    assert r0["unavailable"] == ["trt_engine"]


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path, tiny_config):
    path = tiny_config(extra="[distill]\nepochs = 1\nbaseline = false\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "pipeline", "run", str(path), "--until", "distill"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["teacher"]["status"] == "ok" and manifest["stages"]["distill"]["status"] == "ok"
    assert "accuracy" in manifest["stages"]["distill"]["metrics"]["student"]


# -- joining the process group (no processes started: init_process_group is recorded) --------


@pytest.fixture
def recorded_init(monkeypatch):
    """`pipeline.dist.init` as torchrun's rank 1 of 2 sees it, with init_process_group and
    torch.cuda.set_device recorded instead of run."""
    from pipeline import dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("PIPELINE_DIST_TIMEOUT_S", raising=False)
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    return dist, calls


@pytest.mark.parametrize("device, cuda, backend", [
    ("cpu", True, "gloo"),      # a CPU run on a GPU machine must not pick NCCL
    ("cpu", False, "gloo"),
    ("auto", True, "nccl"),
    ("auto", False, "gloo"),
    ("cuda", True, "nccl"),
    ("cuda:1", True, "nccl"),
    ("cuda", False, "gloo"),    # the config check then says no CUDA device is visible (exit 2)
])
def test_backend_follows_the_configured_device(recorded_init, monkeypatch, device, cuda, backend):
    dist, calls = recorded_init
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert dist.init(device) is True
    name, kw = calls[-1]
    assert name == backend
    # Rank 0 alone exports and measures while the others wait: far above NCCL's 10 minutes.
    assert kw["timeout"] == dist.TIMEOUT and dist.TIMEOUT.total_seconds() >= 3600
    if backend == "nccl":
        assert calls[0] == ("set_device", torch.device("cuda", 1))
        assert kw["device_id"] == torch.device("cuda", 1)
    else:
        assert "device_id" not in kw and len(calls) == 1


def test_timeout_from_the_environment(recorded_init, monkeypatch):
    dist, calls = recorded_init
    monkeypatch.setenv("PIPELINE_DIST_TIMEOUT_S", "90")
    dist.init("cpu")
    assert calls[-1][1]["timeout"].total_seconds() == 90
    monkeypatch.setenv("PIPELINE_DIST_TIMEOUT_S", "soon")
    with pytest.raises(UserError, match="PIPELINE_DIST_TIMEOUT_S"):
        dist.init("cpu")


def test_single_process_joins_nothing(recorded_init, monkeypatch):
    dist, calls = recorded_init
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.init("cuda") is False and calls == []

