"""The errors a user can cause and fix, in one module.

Each carries a one-line message that says what is wrong and, where it can, what to do; the
command line prints it as ``error: ...`` and exits with status 2 (no traceback). Code that
calls the Python API can catch :class:`MobileOError` for all of them.
"""


class MobileOError(Exception):
    """Base class of every user-facing error of mobileo-mlx."""


class InputError(MobileOError, ValueError):
    """A bad input: an option out of range, an unreadable picture, an empty prompt."""


class ConversionError(MobileOError):
    """A problem with a checkpoint to convert or with the conversion's output folder."""


class HubError(ConversionError):
    """The hub could not provide a model (says which files to fetch by hand)."""


class WeightsError(MobileOError, ValueError):
    """A converted folder that cannot be loaded."""
