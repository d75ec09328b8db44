"""Tests for pipeline.tasks.common.box_decode: decode reproduces torchvision's own postprocess from the raw
outputs, and the exported graph (ONNX Runtime, OpenVINO) decodes to the same detections."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.tasks.common.detectors import DetRaw
from pipeline.tasks.common.box_decode import decode, torchvision_detector
from tests.test_detmodels import C, S, _build, _raw, _x

PARITY = [("retinanet_resnet18_fpn", 64), ("fcos_resnet18_fpn", 64), ("ssdlite320_mobilenet_v3_large", 64),
          ("retinanet_resnet18_fpn", 128)]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in test_detmodels: the machine is small and shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _confident_heads(model: DetRaw, seed: int = 1) -> None:
    """Spread the final convs' weights and biases so that scores are well separated and many
    pass the threshold (torchvision's prior-0.01 init keeps every score below 0.05)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in model.head_layers:
            modules[name].weight.normal_(0.0, 0.05, generator=g)
            modules[name].bias.uniform_(-3.0, 1.0, generator=g)


# -- Decode = torchvision's postprocess ------------------------------------------------------


@pytest.mark.parametrize(("arch", "size"), PARITY)
@pytest.mark.parametrize("settings", [
    dict(score_thresh=0.05, nms_iou=0.5, topk_candidates=1000, max_detections=100),
    dict(score_thresh=0.3, nms_iou=0.4, topk_candidates=5, max_detections=300),  # per-level top-k bites
])
def test_decode_matches_torchvision_postprocess(arch, size, settings):
    from torchvision.models import detection as det

    model = _build(arch, size=size)
    _confident_heads(model)
    x = _x(size=size, seed=2)
    reference = torchvision_detector(model, **settings).eval()
    assert isinstance(reference, {"retinanet": det.RetinaNet, "fcos": det.FCOS, "ssd": det.ssd.SSD}[model.arch_kind])

    with torch.no_grad():
        theirs = reference(list(x))  # torchvision's forward: transform (a no-op here), head, postprocess
    ours = decode(_raw(model, x), model.anchors, arch_kind=model.arch_kind, image_size=size,
                  level_sizes=model.level_sizes, **settings)

    assert len(ours) == len(theirs) == 2
    background = 1 if model.arch_kind == "ssd" else 0
    for mine, ref in zip(ours, theirs):
        assert 0 < len(mine["scores"]) <= settings["max_detections"]
        assert mine["boxes"].dtype == np.float32 and mine["labels"].dtype == np.int64
        assert mine["boxes"].shape == (len(ref["boxes"]), 4)
        np.testing.assert_allclose(mine["boxes"], ref["boxes"].numpy(), atol=1e-4)
        np.testing.assert_allclose(mine["scores"], ref["scores"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(mine["labels"], ref["labels"].numpy() - background)
        assert mine["labels"].min() >= 0 and mine["labels"].max() < C
        assert (mine["boxes"] >= 0).all() and (mine["boxes"] <= size).all()


def test_decode_rejects_incomplete_outputs():
    model = _build("fcos_resnet18_fpn")
    out = _raw(model, _x())

    with pytest.raises(ValueError, match="lack bbox_ctrness"):
        decode({k: v for k, v in out.items() if k != "bbox_ctrness"}, model.anchors, arch_kind="fcos", image_size=S,
               level_sizes=model.level_sizes)
    with pytest.raises(ValueError, match="level_sizes"):
        decode(out, model.anchors, arch_kind="fcos", image_size=S)
    with pytest.raises(ValueError, match="arch_kind 'yolo'"):
        decode(out, model.anchors, arch_kind="yolo", image_size=S)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["retinanet_resnet18_fpn", "fcos_resnet18_fpn", "ssdlite320_mobilenet_v3_large"])
def test_onnx_raw_outputs_and_decode_match_torch(tmp_path, arch):
    """ONNX Runtime (and OpenVINO, where installed) run the exported graph like torch."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _build(arch)
    _confident_heads(model)
    file = tmp_path / "det.onnx"
    common = dict(input_names=["input"], output_names=list(model.output_names), opset_version=18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (_x(),), str(file), dynamo=True, external_data=False, verbose=False, **common)
        except Exception:  # noqa: BLE001 - the TorchScript exporter is the pipeline's fallback too
            torch.onnx.export(model, (_x(),), str(file), dynamo=False, **common)

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    ort = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": _x().numpy()}), strict=True))
    ref = _raw(model, _x())

    assert tuple(ort) == model.output_names
    assert all(ort[n].shape == ref[n].shape and np.abs(ort[n] - ref[n]).max() < 1e-4 for n in ref)
    settings = dict(arch_kind=model.arch_kind, image_size=S, level_sizes=model.level_sizes, score_thresh=0.2)
    for a, b in zip(decode(ort, model.anchors, **settings), decode(ref, model.anchors, **settings), strict=True):
        assert len(a["scores"]) == len(b["scores"]) > 0
        # Box offsets are scaled by the anchor size (up to 128 px at P7): 1e-4 raw is ~0.03 px here.
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=0.05)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
        np.testing.assert_array_equal(a["labels"], b["labels"])
    try:
        import openvino as ov
    except ImportError:
        return
    # OpenVINO at f32: its CPU default (bf16 on some CPUs) differs by up to ~1e-2 on these outputs.
    compiled = ov.Core().compile_model(str(file), "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(_x().numpy())
    assert all(np.abs(result[o] - ref[o.get_any_name()]).max() < 1e-4 for o in compiled.outputs)
