"""Torch eager as a :class:`pipeline.bench.Runtime`: the reference every exported build is compared with.

It lives in the core because every training stage measures its torch models with it; the
exported runtimes (ONNX Runtime, OpenVINO, TensorRT) live in `export/runtimes.py`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.bench import resolve_threads


class TorchRuntime:
    """A torch module run eagerly, the reference every exported build is compared against."""

    name = "torch"
    input_names = ("input",)

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        threads: int = 0,
        channels_last: bool = False,
        output_names: tuple[str, ...] = ("logits",),
    ) -> None:
        """Put `model` in eval mode on `device`; torch's intra-op thread count is fixed in `prepare`.

        `threads = 0` means every usable core; the resolved count is kept in `.threads`.
        `output_names` names the model's outputs in order (the task's, as in its ONNX export).
        Note that the model itself is moved and switched to eval mode (no copy is made).
        """
        self.output_names = tuple(output_names)
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

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output as float32 numpy, by name: a tensor, a tuple/list (in `output_names`
        order; extra entries such as auxiliary logits are dropped) or a dict of tensors."""
        out = self.infer(self.prepare(batch))
        if isinstance(out, dict):
            items = [(n, out[n]) for n in self.output_names]
        elif isinstance(out, (tuple, list)):
            items = list(zip(self.output_names, out))
        else:
            items = [(self.output_names[0], out)]
        return {n: t.detach().float().cpu().numpy() for n, t in items}

    def __repr__(self) -> str:
        return f"TorchRuntime(device={self.device!r}, threads={self.threads}, channels_last={self.channels_last})"
