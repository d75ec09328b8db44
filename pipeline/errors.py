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

    def __init__(self, *args: object):
        # A DataLoader worker process that raises (an unreadable image met mid-epoch) has torch
        # re-raise the same class in the training process with ONE argument: "Caught X in
        # DataLoader worker process N.\nOriginal Traceback ...". Keep the user's one line.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") and "\nOriginal Traceback" in args[0]:
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            lines = [line[len(prefix):] for line in args[0].splitlines() if line.startswith(prefix)]
            if lines:
                args = (lines[-1],)
        super().__init__(*args)


class ConfigError(UserError):
    """A mistake in the config or the files it names: one line, exit code 2."""


class DataError(ConfigError):
    """Bad training or evaluation data (a file named in the message): one line, exit code 2."""


class LibraryError(RuntimeError):
    """A library failed internally; `library` names it (e.g. "Torch-Pruning")."""

    def __init__(self, library: str, message: str):
        super().__init__(f"{library} failed: {message}")
        self.library = library
