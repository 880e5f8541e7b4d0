"""Errors about the data a user handed in. Each message names the file, line or key; the `vicap` command
prints it without a traceback (exit code 2). Any other exception is a bug."""

from __future__ import annotations


class DataPrepError(Exception):
    """Base of data_prep's user-facing errors."""


class SourceError(DataPrepError, ValueError):
    """A dataset file that cannot be parsed at all; the message names file and line."""


class SourceNotFoundError(DataPrepError, FileNotFoundError):
    """A dataset file or folder that is not there; the message says what was looked for."""


class ManifestError(DataPrepError, ValueError):
    """A manifest file that cannot be read; the message names the file and line."""


class AdapterNotFoundError(DataPrepError, KeyError):
    """An adapter or language name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SettingError(DataPrepError, ValueError):
    """An option or setting with a value data_prep cannot use; the message names it."""
