"""Where in the user's code something happened: the innermost frame outside torch and fx_bk."""

from __future__ import annotations

import contextlib
import os
import traceback

import torch

_HERE = os.path.dirname(__file__)
_SKIP = (os.path.dirname(torch.__file__) + os.sep, _HERE + os.sep,
         os.path.join(os.path.dirname(_HERE), "passes") + os.sep, contextlib.__file__)


def user_frame(error: BaseException | None = None) -> str:
    """The innermost frame outside torch and fx_bk (of the current stack, or of ``error``'s
    traceback), as ``File "...", line N, in fn``."""
    frames = (traceback.extract_tb(error.__traceback__) if error is not None
              else traceback.extract_stack())
    for frame in reversed(frames):
        if not frame.filename.startswith(_SKIP):
            return f'File "{frame.filename}", line {frame.lineno}, in {frame.name}'
    return "an unknown place"
