"""data_prep: languages (normalize, segment, metric tokens) and dataset adapters -> manifest.

Dataset adapters live in `data_prep.datasets` (imported on use: it pulls in PIL).
"""

from data_prep.languages import (
    LANGUAGES,
    Language,
    get_language,
    normalize,
    register_language,
    segment,
    segment_many,
)
from data_prep.manifest import Manifest, ManifestError, Record, read_manifest, write_manifest

__all__ = [
    "LANGUAGES",
    "Language",
    "Manifest",
    "ManifestError",
    "Record",
    "get_language",
    "normalize",
    "read_manifest",
    "register_language",
    "segment",
    "segment_many",
    "write_manifest",
]
