"""The layers that produce a model's outputs, to keep in floating point when quantizing to INT8.

A detector's raw outputs are box offsets and class logits: small errors there move boxes and
flip scores near the threshold, which is why NNCF's detection examples keep the head's output
ops in FP (an "ignored scope"). A task opts in with ``Task.int8_fp32_outputs``; these helpers
find, generically, the last weighted layers (Conv / Gemm / MatMul) on every path back from each
graph output, walking through the reshape / transpose / concat / activation ops between them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import openvino as ov

_ONNX_WEIGHTED = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})
_OV_WEIGHTED = frozenset({"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"})
# Shape computations read a tensor's dimensions, not its values: not a path of the output's values.
_SHAPE_OPS = frozenset({"Shape", "ShapeOf", "Size"})


def onnx_output_layers(model: "onnx.ModelProto") -> list[str]:
    """Names of the ONNX nodes that are the last weighted layer before a graph output."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    seen: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in _SHAPE_OPS:
            continue
        if node.op_type in _ONNX_WEIGHTED:
            if node.name:
                found.append(node.name)
            continue
        stack.extend(node.input)
    return sorted(found)


def openvino_output_layers(model: "ov.Model") -> list[str]:
    """Friendly names of the OpenVINO ops that are the last weighted layer before a result."""
    found: list[str] = []
    seen: set[str] = set()
    stack: list[Any] = [r for r in model.get_results()]
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        if node.get_type_name() in _SHAPE_OPS:
            continue
        if node.get_type_name() in _OV_WEIGHTED:
            found.append(name)
            continue
        stack.extend(node.input_value(i).get_node() for i in range(node.get_input_size()))
    return sorted(found)
