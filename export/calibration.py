"""Calibration data for INT8 builds, shared by the ONNX Runtime and TensorRT stages.

Calibration always reads the calibration split (training images seen through the evaluation
transform), never evaluation images, so an INT8 build is never tuned on what it is judged on.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def calibration_reader(batches: Iterable, input_name: str, fixed_batch: int | None = None, *,
                       description: str = "calibration"):
    """An onnxruntime CalibrationDataReader over `(images, ...)` batches, counting the images.

    A model with a fixed batch size is fed that many images per call. On a terminal a progress
    bar named `description` counts the batches as the calibrator reads them.
    """
    from onnxruntime.quantization import CalibrationDataReader

    from pipeline.ui import track

    try:
        total: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = 0
            self._batches = iter(track(batches, description, total))
            self._pending: list[np.ndarray] = []

        def get_next(self) -> dict[str, np.ndarray] | None:
            while not self._pending:
                item = next(self._batches, None)
                if item is None:
                    return None
                x = item[0].detach().cpu().numpy().astype(np.float32, copy=False)
                step = fixed_batch or len(x)
                # A remainder smaller than a fixed batch cannot be fed; it is dropped.
                self._pending = [x[i : i + step] for i in range(0, len(x), step) if len(x[i : i + step]) == step]
            x = self._pending.pop(0)
            self.images += len(x)
            return {input_name: np.ascontiguousarray(x)}

    return _Reader()
