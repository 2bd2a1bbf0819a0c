"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class F3ExportError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class RecipeError(F3ExportError):
    """The recipe (or a --set override) is malformed; the message names the key."""


class CheckpointError(F3ExportError):
    """A model folder or weights file cannot be used; the message names the file."""


class GateError(F3ExportError):
    """A validation gate failed: the build ran, but its result must not be used."""

    exit_code = 1


class CheckError(F3ExportError):
    """`f3export check` found drift, a missing file or a hash mismatch."""

    exit_code = 1


class BackendUnavailable(F3ExportError):
    """An engine backend was asked for, but its runtime is not installed or has no device."""
