"""Rank an INT8 model's quantized layers by how much error each one adds, most sensitive first.

The proxy is per-layer output error on calibration images, not the task metric: measuring the
metric with each layer quantized alone costs one build and one full evaluation per layer (a
ResNet-18 has 21 weighted layers), while this costs two forward passes of a few calibration
images. Both graphs, the FP32 ONNX and its Q/DQ INT8 build, are run by ONNX Runtime with every
weighted layer's (Conv / Gemm / MatMul) input and output tensors added as graph outputs. For each
layer (found by node name; ORT folds a following ReLU into it, so its output is the ReLU's) the
normalized mean squared error of its output vs FP32, ``E[(q - f)^2] / E[f^2]``, is
taken *minus* the same error of its activation input: what the layer itself adds (the
quantization of its input and weights), not the error it inherited from the layers before it,
which would otherwise rank every deep layer first. Calibration images only: never the images
the build is judged on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    import onnx
    import openvino as ov

log = logging.getLogger(__name__)

WEIGHTED_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})
_OV_WEIGHTED = frozenset({"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"})


@dataclass(frozen=True)
class LayerError:
    """One quantized layer's error: its node name, output NMSE, and what it adds over its input's."""

    name: str
    output_nmse: float
    added_nmse: float

    def record(self) -> dict:
        return {"layer": self.name, "output_nmse": self.output_nmse, "added_nmse": self.added_nmse}


def weighted_nodes(model: "onnx.ModelProto") -> list["onnx.NodeProto"]:
    """The FP32 graph's weighted layers (the ones INT8 quantizes), in graph order, named ones only."""
    return [n for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.name]


def _with_outputs(model: "onnx.ModelProto", names: list[str]) -> bytes:
    """The model's bytes with `names` added as graph outputs (type left to ONNX Runtime)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name not in have:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return copy.SerializeToString()


def _session(data: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Graph optimisations would fuse or drop the tensors read here.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _tensors(q_model: "onnx.ModelProto", name: str, f_tensors: set[str]) -> tuple[str, str] | None:
    """(input, output) tensor names of layer `name` in the Q/DQ graph that the FP32 graph also
    holds: the input before its Q/DQ pair, and the output (a fused activation's, since the
    quantizer folds a following ReLU into the layer; after its Q/DQ pair when the layer's own
    output name is new). None when the layer is not in the INT8 graph."""
    producer = {t: n for n in q_model.graph.node for t in n.output}
    consumers: dict[str, list] = {}
    for n in q_model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    node = next((n for n in q_model.graph.node if n.name == name), None)
    if node is None:
        return None
    inp = node.input[0]
    while inp in producer and producer[inp].op_type in ("DequantizeLinear", "QuantizeLinear"):
        inp = producer[inp].input[0]
    out = node.output[0]
    for _ in range(2):  # through a QuantizeLinear -> DequantizeLinear pair to a name FP32 has
        if out in f_tensors:
            break
        nxt = [c for c in consumers.get(out, []) if c.op_type in ("QuantizeLinear", "DequantizeLinear")]
        if not nxt:
            break
        out = nxt[0].output[0]
    return (inp, out) if inp in f_tensors and out in f_tensors else None


def rank_layers(fp32: Path, int8: Path, batches: Iterable[np.ndarray], *, input_name: str = "input",
                threads: int = 0) -> list[LayerError]:
    """The FP32 graph's weighted layers ranked by the error their INT8 build adds, most first.

    ``int8`` is the Q/DQ build of ``fp32`` (the same node and tensor names). ``batches``: float32
    NCHW calibration images. A layer whose tensors the INT8 graph does not hold is ranked last.
    """
    import onnx

    f_model, q_model = onnx.load(str(fp32)), onnx.load(str(int8))
    nodes = weighted_nodes(f_model)
    f_tensors = {t for n in f_model.graph.node for t in n.output} | {i.name for i in f_model.graph.input}
    pairs = {n: p for n, p in ((n.name, _tensors(q_model, n.name, f_tensors)) for n in nodes) if p is not None}
    inputs = {i.name for i in f_model.graph.input}  # the images themselves: no error
    wanted = sorted({t for i, o in pairs.values() for t in (i, o) if t not in inputs})
    f_sess = _session(_with_outputs(f_model, wanted), threads)
    q_sess = _session(_with_outputs(q_model, wanted), threads)
    # ORT's quantizer drops a ReLU after a layer or an Add (the output's Q/DQ clamps at zero), so
    # in the INT8 graph the ReLU's tensor holds its input: apply the ReLU to compare.
    f_op = {t: n.op_type for n in f_model.graph.node for t in n.output}
    q_op = {t: n.op_type for n in q_model.graph.node for t in n.output}
    relu = {t for t in wanted if f_op.get(t) == "Relu" and q_op.get(t) not in (None, "Relu")}
    sq_err = dict.fromkeys(wanted, 0.0)
    sq_ref = dict.fromkeys(wanted, 0.0)
    dim = f_sess.get_inputs()[0].shape[0]
    fixed = dim if isinstance(dim, int) and dim > 0 else None  # a fixed-batch export takes that many
    pieces = (x[i:i + fixed] for batch in batches for x in [np.asarray(batch)]
              for i in range(0, len(x) - (fixed or len(x)) + 1, fixed or max(len(x), 1))) if fixed else batches
    for x in pieces:
        feed = {input_name: np.ascontiguousarray(x, dtype=np.float32)}
        f_out = dict(zip([o.name for o in f_sess.get_outputs()], f_sess.run(None, feed)))
        q_out = dict(zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, feed)))
        for t in wanted:
            f, q = np.asarray(f_out[t], np.float64), np.asarray(q_out[t], np.float64)
            if t in relu:
                q = np.maximum(q, 0.0)
            sq_err[t] += float(np.sum((q - f) ** 2))
            sq_ref[t] += float(np.sum(f ** 2))
    nmse = {t: sq_err[t] / sq_ref[t] if sq_ref[t] > 0 else 0.0 for t in wanted}
    ranked: list[LayerError] = []
    missing: list[LayerError] = []
    for n in nodes:
        if n.name not in pairs:
            missing.append(LayerError(n.name, float("nan"), float("nan")))
            continue
        i, o = pairs[n.name]
        ranked.append(LayerError(n.name, nmse[o], nmse[o] - nmse.get(i, 0.0)))
    ranked.sort(key=lambda e: -e.added_nmse)  # stable: ties keep graph order
    if missing:
        log.info("sensitivity: %d layer(s) not found in the INT8 graph, ranked last", len(missing))
    return ranked + missing


def openvino_names(model: "ov.Model", onnx_model: "onnx.ModelProto", layers: list[str]) -> dict[str, str]:
    """ONNX node name -> the OpenVINO op converted from it (same friendly name, or the op whose
    output carries the node's output tensor name); layers without a match are left out."""
    outputs = {n.name: n.output[0] for n in onnx_model.graph.node if n.name}
    by_name, by_tensor = {}, {}
    for op in model.get_ops():
        by_name[op.get_friendly_name()] = op.get_friendly_name()
        for k in range(op.get_output_size()):
            for t in op.output(k).get_names():
                by_tensor.setdefault(t, op.get_friendly_name())
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    found: dict[str, str] = {}
    for layer in layers:
        hit = by_name.get(layer) or by_tensor.get(outputs.get(layer, ""))
        op = ops.get(hit) if hit is not None else None
        # A Conv with a bias converts to Convolution + Add, the tensor name landing on the Add:
        # walk back to the weighted op, which is what NNCF quantizes.
        for _ in range(3):
            if op is None or op.get_type_name() in _OV_WEIGHTED:
                break
            op = op.input_value(0).get_node() if op.get_input_size() else None
        if op is not None and op.get_type_name() in _OV_WEIGHTED:
            found[layer] = op.get_friendly_name()
    return found

