"""vicap's user-facing errors, in one place.

A `VicapError` (or data_prep's `DataPrepError`) carries a message that is the whole story: what was
wrong, naming the file, line, key or value, and what to do. The `vicap` command prints it as
`error: ...` with exit code 2 and no traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from data_prep.errors import DataPrepError


class VicapError(Exception):
    """Base of vicap's user-facing errors."""


class RecipeError(VicapError, ValueError):
    """A recipe that cannot be used; the message names the file and the key."""


class CheckpointError(VicapError, ValueError):
    """A checkpoint that is missing, corrupt, or does not match its recipe."""


class ModelLoadError(VicapError, RuntimeError):
    """A model could not be loaded; the message says what was looked for and how to provide it."""


class ImageError(VicapError, ValueError):
    """An image that cannot be used; the message names the file."""


class DeviceError(VicapError, ValueError):
    """A device setting this machine cannot honour; the message names the setting."""


class TrainingError(VicapError, RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message names the step and what to change."""


class RunExistsError(VicapError, FileExistsError):
    """A run directory that already holds what a command would overwrite."""


class MissingFileError(VicapError, FileNotFoundError):
    """A file or folder a command needs is not there; the message says which and how to make it."""


class MetricError(VicapError, RuntimeError):
    """A scorer that was available failed while running; the message carries its error output."""


class UnknownNameError(VicapError, KeyError):
    """A name that is not registered (a mapper, an encoder, a published reference); lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UsageError(VicapError, ValueError):
    """Arguments that do not fit together (an empty split, an output file of an unknown type, ...)."""


# What the command line reports as `error: ...` (exit code 2) instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (VicapError, DataPrepError)
