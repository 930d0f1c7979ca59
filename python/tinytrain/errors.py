"""Typed errors of tinytrain. Every error a user can cause derives from `TinytrainError`.

Keep this module a flat list of exception classes: other stages add their own here.
"""
from __future__ import annotations


class TinytrainError(Exception):
    """Base class of every error tinytrain raises on bad models, data or settings."""


class ModelFormatError(TinytrainError, ValueError):
    """A model file is malformed, truncated, inconsistent or uses a shape tinytrain cannot resolve.

    The message names the file and the node / tensor / field at fault.
    """


class UnsupportedOperatorError(TinytrainError, NotImplementedError):
    """A model contains an operator (or an attribute value of one) tinytrain cannot lower.

    Attributes: ``node`` (node name), ``op_type``, ``opset`` (of the op's domain) and ``reason``.
    """

    def __init__(self, node: str, op_type: str, opset: int, reason: str = "") -> None:
        self.node = node
        self.op_type = op_type
        self.opset = opset
        self.reason = reason
        msg = f"node {node!r}: operator {op_type} (opset {opset}) is not supported"
        if reason:
            msg += f": {reason}"
        super().__init__(msg)


class QuantizationError(TinytrainError, ValueError):
    """Quantization was asked for something it cannot do (already quantized model, bad calibration data)."""


class PlanError(TinytrainError, ValueError):
    """A plan file is truncated, corrupted, of another version, or does not match its weights.

    ``field`` names the part of the plan that failed to validate.
    """

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        super().__init__(message)


class MemoryBudgetError(TinytrainError, ValueError):
    """A training plan does not fit the memory budget.

    ``needed`` is the plan's peak SRAM in bytes, ``budget`` the budget in bytes.
    """

    def __init__(self, needed: int, budget: int, detail: str = "") -> None:
        self.needed = int(needed)
        self.budget = int(budget)
        msg = (f"training needs {self.needed} bytes ({self.needed / 1024:.1f} KB) of SRAM, "
               f"the budget is {self.budget} bytes ({self.budget / 1024:.1f} KB)")
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)


class UpdateError(TinytrainError, ValueError):
    """A fleet update blob is truncated, corrupted, written for another plan, or its values do not
    have the plan's trained parameter names, shapes and dtypes.

    ``field`` names what failed (``"plan_tag"`` for a blob of another plan).
    """

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        super().__init__(message)


class OutputPathError(TinytrainError, ValueError):
    """An output path cannot be written safely: it names a device, a FIFO, a folder or a symlink,
    its folder does not exist or is not writable, or a bundle folder holds files of the user's.

    ``path`` is the path as given. Raised before any work starts.
    """

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class DataError(TinytrainError, ValueError):
    """Samples, labels or targets that cannot be used as given: values the model's int8 input cannot
    hold, labels of the wrong shape or outside the classes, targets of another task than the model's.

    ``what`` names the data at fault ("inputs", "labels", "test samples", a file ...). The message
    says what was found and how to fix it.
    """

    def __init__(self, message: str, what: str = "") -> None:
        self.what = what
        super().__init__(message)


class NonFiniteDataError(DataError):
    """Inputs or targets holding NaN or infinite values (an int8 cast would silently make them 0 or
    saturate them). ``count`` is the number of such values, ``samples`` the number of samples they
    are in, ``first`` the index of the first such sample."""

    def __init__(self, message: str, what: str = "", count: int = 0, samples: int = 0, first: int = -1) -> None:
        self.count = int(count)
        self.samples = int(samples)
        self.first = int(first)
        super().__init__(message, what)


class DataWarning(UserWarning):
    """Data was usable only after a conversion tinytrain made and says (e.g. 8-bit pixels divided by
    255 for a model whose input covers [0, 1]), or looks unlike what the model was calibrated on."""


class SchemeError(TinytrainError, ValueError):
    """A sparse-update scheme asked for does not apply to the model (e.g. the paper's scheme on a
    network without inverted-residual blocks). The message lists the schemes that do."""
