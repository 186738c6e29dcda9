"""Errors fx_bk raises before the first training step.

Every message names what is wrong (module path, op, parameter) and what to do about it. Problems
found in one model are collected and raised together, once.
"""

from __future__ import annotations

from dataclasses import dataclass


class FxBkError(Exception):
    """Base class of every fx_bk error."""


class ConfigError(FxBkError, ValueError):
    """An argument of ``fx_bk.transform`` has an invalid value."""


@dataclass(frozen=True)
class Problem:
    """One thing in a model that fx_bk cannot make differentially private as it is."""

    kind: str  # "unsupported-op", "batch-norm", "mixes-samples", ...
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


class UnsupportedModelError(FxBkError):
    """The model has one or more problems; ``.problems`` lists them all."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  {i + 1}. {p}" for i, p in enumerate(self.problems))
        super().__init__(
            f"fx_bk cannot compute per-sample clipped gradients for this model "
            f"({len(self.problems)} problem(s)):\n{lines}"
        )


class NonFiniteSampleError(FxBkError, FloatingPointError):
    """A sample's gradient norm is NaN or infinite and ``nonfinite="raise"`` was set."""


class ClipOnceError(FxBkError):
    """A backward pass would clip some samples of an fx_bk module twice in one step (two
    forward calls feeding one backward, or a second backward through one forward)."""


class ReducedPrecisionError(FxBkError):
    """A global setting makes float32 GEMMs or convolutions round in TF32 or bf16, which would
    let rounding add more than ``max_grad_norm`` of one sample (``fx_bk/precision_guard.py``)."""


def raise_if_any(problems: list[Problem]) -> None:
    if problems:
        raise UnsupportedModelError(problems)
