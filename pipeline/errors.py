"""Whose fault is it? The three kinds of error the pipeline reports.

- :class:`UserError` (and its :class:`ConfigError` / :class:`DataError` kinds): something the
  user can fix in their config, data, checkpoints or workdir. Printed as one line, exit code 2.
- :class:`LibraryError`: a library the pipeline relies on (Torch-Pruning, an ONNX exporter,
  OpenVINO, NNCF, TensorRT) failed internally. Reported with the library named, never as a
  config error; the stage is recorded as failed (exit code 1).
- anything else is a bug in the pipeline itself: the stage fails, `-v` shows the traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix (config, data, checkpoint, workdir): one line, exit code 2."""


class ConfigError(UserError):
    """A mistake in the config or the files it names: one line, exit code 2."""


class DataError(ConfigError):
    """Bad training or evaluation data (a file named in the message): one line, exit code 2."""


class LibraryError(RuntimeError):
    """A library failed internally; `library` names it (e.g. "Torch-Pruning")."""

    def __init__(self, library: str, message: str):
        super().__init__(f"{library} failed: {message}")
        self.library = library
