"""QAD stage: NNCF QAT of a tiny student a step with the teacher's distillation loss, exported to
OpenVINO (INT8 FakeQuantize ops) and to a signed-INT8 Q/DQ ONNX; `when` decides; bad configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nncf")
pytest.importorskip("openvino")

from pipeline.errors import ConfigError  # noqa: E402
from pipeline.models import build_student, build_teacher  # noqa: E402
from pipeline.stage import REGISTRY, StageContext, load_stages  # noqa: E402
from tests.conftest import tiny_cfg, tiny_data  # noqa: E402


_cfg = tiny_cfg


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def _ctx(tmp_path: Path, bundle, extra: str) -> StageContext:
    workdir = tmp_path / "run"
    cfg = _cfg(workdir, extra)
    workdir.mkdir(parents=True)
    torch.manual_seed(0)
    teacher, student = workdir / "teacher.pt", workdir / "student.pt"
    torch.save(build_teacher(cfg, 10).state_dict(), teacher)
    torch.save(build_student(cfg, 10).state_dict(), student)
    ctx = StageContext(cfg=cfg, name="qad", workdir=workdir, inputs={"student": student, "teacher": teacher},
                       device=torch.device("cpu"), key="test")
    ctx._data = bundle
    return ctx


def test_qad_trains_a_step_and_exports(tmp_path, bundle):
    from export.runtimes import OpenVINORuntime, OrtRuntime
    from stages import qad

    ctx = _ctx(tmp_path, bundle, '[distill]\nmethod = "mgd+kd"\n[qad]\nwhen = "always"\nmax_steps = 1\n')
    result = qad.run(ctx)
    info = result.metrics["openvino_int8_qad"]
    assert info["steps"] == 1 and info["recipe"] == "qad" and info["alternative_of"] == "openvino_int8"
    # The teacher's distillation terms and the task loss all trained the step.
    assert {"task", "mgd", "kd"} <= set(info["last_loss_terms"]), info["last_loss_terms"]
    xml = result.outputs["openvino_int8_qad"]
    assert "FakeQuantize" in xml.read_text()  # OpenVINO runs these layers in INT8
    x = next(iter(bundle.loader("val", 8)))[0].numpy()
    out = OpenVINORuntime(xml, threads=1).outputs(x)
    assert set(out) == {"logits"} and out["logits"].shape == (len(x), 10) and np.isfinite(out["logits"]).all()
    qdq = result.outputs["trt_qdq_qad"]
    import onnx

    model = onnx.load(str(qdq))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert OrtRuntime(qdq, threads=1).outputs(x)["logits"].shape == (len(x), 10)
    assert "trt_engine_qad" in result.unavailable  # TensorRT latency is not measured here
    assert set(result.measure) == {"openvino_int8_qad", "trt_qdq_qad"}


def test_qad_does_not_run_when_ptq_has_no_gate(tmp_path, bundle):
    from stages import qad

    ctx = _ctx(tmp_path, bundle, "[qad]\nepochs = 1\n")  # a table without `when`: ptq_fails
    assert ctx.cfg.qad.when == "ptq_fails"
    result = qad.run(ctx)
    assert result.outputs == {} and result.metrics["qad"]["ran"] is False
    assert "no INT8 drop gate" in result.metrics["qad"]["decision"]


def test_qad_is_off_without_its_table_and_runs_after_the_int8_builds(tmp_path):
    cfg = _cfg(tmp_path / "run")
    load_stages()
    stage = REGISTRY["qad"]
    assert cfg.qad.when == "off" and not stage.enabled(cfg)
    assert stage.order > max(REGISTRY[s].order for s in ("openvino", "tensorrt", "int8_fallback"))


@pytest.mark.parametrize("extra, words", [
    ('[qad]\nwhen = "sometimes"\n', "qad.when"),
    ("[qad]\nlr = 0\n", "qad.lr"),
    ("[qad]\nepochs = 0\n", "qad.epochs"),
    ("[qad]\nsteps = 3\n", "steps"),
])
def test_bad_qad_config_is_a_config_error(tmp_path, extra, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path / "run", extra)


def test_qad_without_openvino_int8_is_refused_before_anything_runs(tiny_config, cli):
    path = tiny_config('[qad]\nwhen = "always"\n[openvino]\nprecisions = ["fp32"]\n')
    r = cli("validate", str(path))
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "qad:" in ln]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
