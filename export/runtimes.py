"""Runtime implementations of :class:`pipeline.bench.Runtime`.

Each runtime wraps one built artifact behind the same four members (`name`, `device`,
`threads`, `prepare` / `infer` / `predict`), so the shared harness in `pipeline.bench` and
the accuracy code in `pipeline.evaluate` treat every backend identically.

For now only :class:`TorchRuntime` exists. Later runtimes (ONNX Runtime, OpenVINO,
TensorRT) are added here behind the same interface; their backends are imported lazily
inside the functions that need them, so importing this module never requires them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from pipeline.bench import resolve_threads

log = logging.getLogger(__name__)


class TorchRuntime:
    """A torch module run eagerly, the reference every exported build is compared against."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        threads: int = 0,
        channels_last: bool = False,
    ) -> None:
        """Put `model` in eval mode on `device`; torch's intra-op thread count is fixed in `prepare`.

        `threads = 0` means every usable core; the resolved count is kept in `.threads`.
        Note that the model itself is moved and switched to eval mode (no copy is made).
        """
        self._device = torch.device(device)
        self.device = str(self._device)
        self.threads = resolve_threads(threads)
        self.channels_last = channels_last
        model = model.to(self._device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # Feed the model its own floating dtype so a half-precision module is not handed float32.
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def prepare(self, batch: np.ndarray) -> torch.Tensor:
        """Float32 NCHW numpy → tensor on the device, contiguous or channels_last as configured."""
        # torch's thread count is process-wide, so it is fixed here (outside the timer) rather
        # than at construction; the runner restores the training thread count afterwards.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._device, dtype=self._dtype)
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def infer(self, prepared: torch.Tensor) -> torch.Tensor:
        """One forward pass; blocks until a CUDA result is ready so timing is real."""
        with torch.inference_mode():
            out = self.model(prepared)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return out

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits as float32 numpy, shape (N, num_classes)."""
        out = self.infer(self.prepare(batch))
        if isinstance(out, (tuple, list)):  # e.g. models returning (logits, aux)
            out = out[0]
        return out.detach().float().cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchRuntime(device={self.device!r}, threads={self.threads}, channels_last={self.channels_last})"
