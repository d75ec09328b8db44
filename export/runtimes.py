"""Runtime implementations of :class:`pipeline.bench.Runtime`.

Each runtime wraps one built artifact behind the same members (`name`, `device`, `threads`,
`output_names`, `prepare` / `infer` / `outputs`), so the shared harness in `pipeline.bench` and
the evaluation in `pipeline.evaluate` treat every backend identically. Torch eager, the
reference, is :class:`pipeline.torch_runtime.TorchRuntime`.

Implemented here: :class:`OrtRuntime` (ONNX Runtime: CPU, and
the CUDA / TensorRT execution providers where onnxruntime-gpu is installed),
:class:`OpenVINORuntime`, and :class:`TensorRTRuntime` (a serialized engine; needs the
tensorrt package and CUDA). Each also exposes `input_names` / `output_names`, and
`static_batch`: the model's batch when its input batch is fixed (an `[onnx] dynamic_batch =
false` export, or an engine built from one), None when it is dynamic. A fixed-batch runtime runs
any number of images in pieces of its batch (`outputs`), and the harness times it at its own
batch (`pipeline.bench.latency_metrics`).
Backends are imported lazily inside the constructors, so importing this module never requires
them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.bench import resolve_threads
from pipeline.errors import LibraryError
from pipeline.torch_runtime import TorchRuntime  # noqa: F401 - one import place for every runtime

log = logging.getLogger(__name__)


def _named(names: tuple[str, ...], values: object) -> dict[str, np.ndarray]:
    """Outputs in graph order → float32 numpy arrays by output name (copied out of any reused buffer)."""
    return {n: np.array(v, dtype=np.float32) for n, v in zip(names, values)}


def in_pieces(run: Callable[[np.ndarray], dict[str, np.ndarray]], batch: np.ndarray, size: int | None, *,
              fixed: bool) -> dict[str, np.ndarray]:
    """`run` (one inference → outputs by name) over `batch` in pieces of at most `size` images,
    the outputs concatenated per name.

    With `fixed` every piece must be exactly `size` images (a model whose batch is static): a
    short last piece is padded with copies of its last image and the padding's outputs are
    dropped. Images do not interact in an eval-mode network, so the kept outputs are unchanged.
    `size` None runs the whole batch at once.
    """
    n = len(batch)
    if size is None or (n == size if fixed else n <= size):
        return run(batch)
    parts = []
    for i in range(0, n, size):
        piece = batch[i : i + size]
        real = len(piece)
        if fixed and real < size:
            piece = np.concatenate([piece, np.repeat(piece[-1:], size - real, axis=0)])
        out = run(piece)
        parts.append({k: v[:real] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


class OrtRuntime:
    """An ONNX model on ONNX Runtime.

    `providers` defaults to CPU only; pass e.g. ``["CUDAExecutionProvider",
    "CPUExecutionProvider"]`` on a machine with onnxruntime-gpu. The intra-op thread count is
    fixed (inter-op 1, sequential execution) so timings are comparable with the other runtimes.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 0, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.threads = resolve_threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # warnings about unused initializers etc. are noise here
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(
                f"onnxruntime {ort.__version__} lacks {', '.join(missing)} "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        self.device = "cuda:0" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        dim = self.session.get_inputs()[0].shape[0]  # an int when fixed, a name (or None) when symbolic
        self.static_batch = dim if isinstance(dim, int) and dim > 0 else None

    def prepare(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The input feed: one contiguous float32 array under the model's input name."""
        return {self.input_names[0]: np.ascontiguousarray(batch, dtype=np.float32)}

    def infer(self, prepared: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One synchronous `session.run` (results are host arrays, so it has finished)."""
        return self.session.run(None, prepared)

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output as float32 numpy, by output name (in pieces of a fixed batch)."""
        return in_pieces(lambda x: _named(self.output_names, self.infer(self.prepare(x))), batch, self.static_batch,
                         fixed=True)

    def __repr__(self) -> str:
        return (f"OrtRuntime({self.path.name!r}, providers={self.providers}, threads={self.threads}"
                f"{f', static_batch={self.static_batch}' if self.static_batch else ''})")


class OpenVINORuntime:
    """An OpenVINO IR (`.xml` + `.bin`) or ONNX file compiled by OpenVINO.

    `precision` is OpenVINO's `INFERENCE_PRECISION_HINT`: ``"f32"`` runs FP32 layers in FP32
    (some CPUs otherwise default to bf16, which breaks parity checks); ``"default"`` leaves
    the device's choice. INT8 layers run in INT8 whatever the hint. The latency hint and a
    fixed thread count make batch-1 timings comparable with the other runtimes.
    """

    name = "openvino"

    def __init__(self, path: str | Path, threads: int = 0, device: str = "CPU", precision: str = "f32") -> None:
        import openvino as ov

        self.path = Path(path)
        self.threads = resolve_threads(threads)
        self.device = device.lower()
        self.ov_device = device
        core = ov.Core()
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
        if device.upper().startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = self.threads
        if precision != "default":
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(core.read_model(str(self.path)), device, config)
        # What the device actually uses, recorded in the manifest (it may differ from the hint).
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # "f32", "bf16"
        self.request = self.compiled.create_infer_request()
        self.input_names = tuple(next(iter(i.get_names()), f"input{n}") for n, i in enumerate(self.compiled.inputs))
        self.output_names = tuple(next(iter(o.get_names()), f"output{n}") for n, o in enumerate(self.compiled.outputs))
        shape = self.compiled.inputs[0].get_partial_shape()
        static = shape.rank.is_static and shape.rank.get_length() > 0 and shape[0].is_static
        self.static_batch = int(shape[0].get_length()) if static else None

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """A contiguous float32 array (OpenVINO wraps it without a copy)."""
        return np.ascontiguousarray(batch, dtype=np.float32)

    def infer(self, prepared: np.ndarray) -> np.ndarray:
        """One synchronous inference on the reused infer request (returns the first output's buffer)."""
        self.request.infer({0: prepared})
        return self.request.get_output_tensor(0).data

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output as float32 numpy, by output name (copied out of the request's buffers; in
        pieces of a fixed batch)."""

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            self.infer(self.prepare(x))
            return _named(self.output_names, (self.request.get_output_tensor(i).data for i in range(len(self.output_names))))

        return in_pieces(run, batch, self.static_batch, fixed=True)

    def __repr__(self) -> str:
        return (f"OpenVINORuntime({self.path.name!r}, device={self.ov_device!r}, precision={self.precision}, "
                f"threads={self.threads}{f', static_batch={self.static_batch}' if self.static_batch else ''})")


def _trt_torch_dtypes(trt) -> dict:
    """TensorRT data types → torch dtypes, for the types this TensorRT version has."""
    pairs = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    return {getattr(trt.DataType, k): v for k, v in pairs.items() if hasattr(trt.DataType, k)}


class TensorRTRuntime:
    """A serialized TensorRT engine on one CUDA device.

    Device memory is torch's (no pycuda): `prepare` copies the batch to a CUDA tensor, `infer`
    binds tensor addresses, enqueues `execute_async_v3` on a torch CUDA stream and waits for it,
    so the harness times the whole inference. Everything runs with the engine's device current
    (`torch.cuda.device`), so an engine on ``cuda:1`` works whatever the current device is.
    Output buffers are allocated once per input shape and reused: the tensor `infer` returns is
    overwritten by the next call with that shape. `outputs` splits batches larger than the
    engine's optimization profile allows, and pads the last piece of a fixed-batch engine.
    TensorRT's own failures (no builder/runtime for this driver, an engine of another version
    or GPU) raise :class:`pipeline.errors.LibraryError`.
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, device: str | torch.device = "cuda") -> None:
        import tensorrt as trt

        self.path = Path(path)
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"TensorRT runs on a CUDA device, not {dev}")
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT needs a CUDA device and none is visible")
        self._device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self.device = str(self._device)
        self.threads = 1  # one CUDA stream; host threads play no part in GPU latency
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self._device):
            try:
                self._runtime = trt.Runtime(self._logger)
            except TypeError as exc:  # pybind11's "factory function returned nullptr": no CUDA for TensorRT
                raise LibraryError("TensorRT", f"{trt.__version__} could not create a runtime on {self.device} ({exc}); "
                                   "the NVIDIA driver is probably older than the CUDA this TensorRT was built for") from exc
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise LibraryError("TensorRT", f"{trt.__version__} could not load {self.path.name}: engines are specific "
                                   "to the TensorRT version and GPU they were built with; rebuild it here")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise LibraryError("TensorRT", f"no execution context for {self.path.name} on {self.device} "
                                   "(out of device memory?)")
            self.stream = torch.cuda.Stream(self._device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if len(self.input_names) != 1 or not self.output_names:
            raise RuntimeError(f"{self.path.name}: expected one input and at least one output, "
                               f"got inputs {self.input_names} and outputs {self.output_names}")
        dtypes = _trt_torch_dtypes(trt)
        self._dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        first = self.input_names[0]
        batch = int(self.engine.get_tensor_shape(first)[0])
        # A static engine (built from a fixed-batch ONNX) runs exactly its batch; a dynamic batch
        # is bounded by profile 0's max shape (what the context uses by default).
        self.static_batch = batch if batch > 0 else None
        self.max_batch = int(batch if batch > 0 else self.engine.get_tensor_profile_shape(first, 0)[2][0])
        self._outputs: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

    def prepare(self, batch: np.ndarray) -> torch.Tensor:
        """Float32 NCHW numpy → contiguous CUDA tensor of the engine's input dtype (copy finished)."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._device, dtype=self._dtypes[self.input_names[0]])
        torch.cuda.synchronize(self._device)  # the copy must not land inside the timed infer
        return x.contiguous()

    def infer(self, prepared: torch.Tensor) -> dict[str, torch.Tensor]:
        """One inference; blocks until the engine has finished. Returns every output (reused buffers)."""
        name = self.input_names[0]
        shape = tuple(prepared.shape)
        with torch.cuda.device(self._device):  # the device the engine and its context were created on
            if not self.context.set_input_shape(name, shape):
                allowed = f"exactly {self.static_batch}" if self.static_batch else f"1..{self.max_batch}"
                raise ValueError(f"{self.path.name}: input shape {shape} is outside the engine's profile (batch {allowed})")
            self.context.set_tensor_address(name, prepared.data_ptr())
            outputs = self._outputs.get(shape)
            if outputs is None:
                outputs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n],
                                          device=self._device) for n in self.output_names}
                self._outputs[shape] = outputs
            for n, t in outputs.items():
                self.context.set_tensor_address(n, t.data_ptr())
            # Work queued on torch's current stream (the input copy) must finish before TensorRT reads it.
            self.stream.wait_stream(torch.cuda.current_stream(self._device))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise LibraryError("TensorRT", f"it failed to enqueue {self.path.name}")
            self.stream.synchronize()
        return outputs

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output as float32 numpy, by name; batches above the profile's max are split (a
        fixed-batch engine runs pieces of exactly its batch)."""

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            return {n: t.float().cpu().numpy() for n, t in self.infer(self.prepare(x)).items()}

        return in_pieces(run, batch, self.max_batch, fixed=self.static_batch is not None)

    def __repr__(self) -> str:
        return f"TensorRTRuntime({self.path.name!r}, device={self.device!r}, max_batch={self.max_batch})"
