"""Error types raised by the library; the CLI prints them as one line without a traceback."""

from __future__ import annotations


class FreqarError(Exception):
    """Base class for every user-facing error (bad input, bad file, bad option)."""


class UnknownModel(FreqarError):
    """A model or preset name that is not registered."""


class WeightsNotFound(FreqarError):
    """A checkpoint file is missing or unreadable."""


class CheckpointMismatch(FreqarError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


class InvalidOption(FreqarError):
    """An option value outside its valid range."""
