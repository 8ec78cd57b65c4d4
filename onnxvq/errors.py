"""The one exception type for problems the user can fix.

Everything that is wrong with the user's input (a file that is not ONNX, a config key that
matches no layer, k < 2, ...) raises :class:`OnnxVQError` with a one-line message that names the
problem and says what to do. The CLI prints it as ``error: <message>`` and exits non-zero with no
traceback; anything else escaping is a bug in onnxvq.
"""

from __future__ import annotations

__all__ = ["OnnxVQError"]


class OnnxVQError(Exception):
    """A user-fixable problem, described in one line."""
