"""What vicap says while it works: its own INFO and WARNING messages on stderr, third-party noise quiet.

`configure()` is what the CLI calls (library users may call it too): vicap's and data_prep's loggers
print INFO and up (DEBUG with `verbose`), other libraries only their errors (their warnings too with
`verbose`). Lines are written through tqdm, so they never break a progress bar:

    encoding 1,200 of 1,500 images (300 reused)
    warning: 2 of 1,500 images could not be read and are skipped: ...
"""

from __future__ import annotations

import logging
import os
import sys

OWN = ("vicap", "data_prep")
THIRD_PARTY = ("transformers", "accelerate", "open_clip", "huggingface_hub", "torch", "PIL", "matplotlib")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        if record.levelno >= logging.INFO:
            return msg
        return f"debug {record.name}: {msg}"


class _TqdmHandler(logging.Handler):
    """Writes above any progress bar on stderr (looked up at each write, so redirection works)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def configure(verbose: bool = False) -> None:
    """Route log records to stderr: vicap's from INFO (DEBUG when verbose), others' from ERROR
    (WARNING when verbose). Idempotent."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _TqdmHandler):
            root.removeHandler(h)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbose else logging.ERROR)
    for name in OWN:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning() if verbose else hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars for small models are noise
    except ImportError:
        pass
