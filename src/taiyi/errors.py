"""Errors that reach the user.

Every error raised for a user mistake (bad input, missing model, unwritable output) is a
:class:`TaiyiError`. Its message is one line saying what was wrong and what to do; the CLI prints
it as ``taiyi: error: <message>`` and exits with status 2, without a traceback. A training run that
stopped on Ctrl-C or SIGTERM with its checkpoint saved is a :class:`StoppedError`: ``taiyi: <message>``,
status 130 or 143.
"""

from __future__ import annotations


class TaiyiError(Exception):
    """A user-facing error whose message is one line: what went wrong and what to do."""


class InvalidInputError(TaiyiError, ValueError):
    """An argument, prompt, image or file given by the user is not usable."""


class ModelLoadError(TaiyiError):
    """A model could not be found, resolved or loaded."""


class OutputError(TaiyiError):
    """An output could not be written (missing directory, existing file, disk full)."""


class StoppedError(TaiyiError):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving what lets it continue; ``exit_code`` is
    the shell's code for that signal (130, 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
