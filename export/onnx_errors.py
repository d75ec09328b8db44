"""Why an ONNX export failed: the errors the ONNX stage raises, and the diagnosis that names
the operator the exporter could not translate and the module (its qualified name in the model,
e.g. ``layer4.1.custom``) that calls it.
"""

from __future__ import annotations

import logging
import re
import traceback
from typing import Any

import torch
from torch import nn

from pipeline.errors import LibraryError

log = logging.getLogger(__name__)


class OnnxExportError(LibraryError):
    """The model could not be exported to ONNX (the exporter failed: not a mistake in the config)."""

    def __init__(self, message: str):
        super().__init__("the ONNX exporter", message)


class UnsupportedOperatorError(OnnxExportError):
    """The exporter has no ONNX translation for an operator the model uses.

    `op` is the operator (e.g. ``aten::linalg_qr``), `module` the qualified name of the
    innermost module that calls it (``""`` for the model's own forward, None when unknown).
    """

    def __init__(self, message: str, op: str, module: str | None):
        super().__init__(message)
        self.op = op
        self.module = module


class ParityError(RuntimeError):
    """The exported model's outputs differ from torch's beyond the configured tolerance."""



# How the exporters name an operator they cannot translate, most specific first.
_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.:]+)'"),  # torch.export-based
    re.compile(r"Exporting the operator '([\w.:]+)' to ONNX"),  # TorchScript
    re.compile(r"target=torch\.ops\.([\w.]+)"),  # torch.export-based, node being translated
    re.compile(r"ONNX export of (?:operator )?'?([\w]+::[\w.]+)"),  # TorchScript, older wording
)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes/contexts, outermost first (cycles cut)."""
    seen: list[BaseException] = []
    while exc is not None and not any(exc is s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
    return text.splitlines()[0] if text else type(exc).__name__


def _normalize_op(raw: str) -> str:
    """`aten.linalg_qr.default` / `aten::linalg_qr` → `aten::linalg_qr`."""
    if "::" in raw:
        ns, _, rest = raw.partition("::")
    else:
        ns, _, rest = raw.partition(".")
    name = rest.split(".")[0]
    return f"{ns}::{name}" if name else raw


def _op_from_error(exc: BaseException) -> str | None:
    texts = [str(e) for e in _chain(exc)]
    for pattern in _OP_PATTERNS:
        for text in texts:
            m = pattern.search(text)
            if m:
                return _normalize_op(m.group(1))
    return None


def _module_from_traceback(model: nn.Module, exc: BaseException) -> str | None:
    """Qualified name of the innermost model module whose `forward` was running when `exc` was raised.

    Works for failures while tracing (torch.export / the TorchScript tracer run the Python
    forward); a failure while translating the traced graph has no such frame.
    """
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for e in reversed(_chain(exc)):  # innermost exception first: its frames are the deepest
        for frame, _ in traceback.walk_tb(e.__traceback__):
            code = frame.f_code
            if code.co_name != "forward" or code.co_argcount == 0:
                continue
            owner = frame.f_locals.get(code.co_varnames[0])
            if id(owner) in names:
                found = names[id(owner)]  # later frames are deeper: keep the last
        if found is not None:
            return found
    return None


def _modules_calling(model: nn.Module, example: torch.Tensor, op: str) -> list[str]:
    """Qualified names of the modules whose own code calls `op`, in execution order.

    Runs the model eagerly once, tracking the module stack with forward hooks and seeing every
    ATen call through a dispatch mode; the innermost module on the stack is the caller.
    Returns [] when the op is not seen (e.g. the exporter named a decomposed variant).
    """
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:  # private API: degrade to "module unknown"
        return []

    def base(name: str) -> str:
        return name.split("::")[-1].lstrip("_")

    wanted = base(op)
    stack: list[str] = []
    callers: list[str] = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if base(func.name().split(".")[0]) == wanted and stack and stack[-1] not in callers:
                callers.append(stack[-1])
            return func(*args, **(kwargs or {}))

    def enter(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # must return None: a value would replace the output
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), _Record():
            model(example)
    except Exception:  # noqa: BLE001 - a diagnosis must never hide the export error
        log.debug("eager run for the export diagnosis failed", exc_info=True)
    finally:
        for h in handles:
            h.remove()
    return callers


def diagnose(model: nn.Module, example: torch.Tensor, opset: int,
              errors: list[tuple[str, BaseException]]) -> OnnxExportError:
    """One error naming what failed: the operator and its module when they can be found."""
    exporter, exc = errors[0]  # the preferred exporter's error is the one to report
    tried = " and ".join(e for e, _ in errors)
    for name, err in errors:
        op = _op_from_error(err)
        if op is None:
            continue
        callers = _modules_calling(model, example, op)
        module = callers[0] if callers else _module_from_traceback(model, err)
        if module is None:
            where = "in an unknown module"
        else:
            mtype = type(model.get_submodule(module)).__name__
            where = f"in module '{module}' ({mtype})" if module else f"in the model's own forward ({mtype})"
            if len(callers) > 1:
                where += f" (also in {', '.join(callers[1:4])}{', ...' if len(callers) > 4 else ''})"
        message = (
            f"cannot export operator {op} {where} to ONNX opset {opset} (tried the {tried} exporter"
            f"{'s' if len(errors) > 1 else ''}: no ONNX translation); replace that operation in the "
            f"model with exportable ones, or register a translation for it with torch.onnx"
        )
        return UnsupportedOperatorError(message, op=op, module=module)
    module = _module_from_traceback(model, exc)
    where = f" while tracing module '{module}'" if module else ""
    return OnnxExportError(f"ONNX export failed{where} (tried the {tried} exporter"
                           f"{'s' if len(errors) > 1 else ''}): {first_line(exc)}")
