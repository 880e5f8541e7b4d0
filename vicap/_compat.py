"""Environment guards that must run before open_clip, peft or transformers' vision code import.

The CPU build of torch is paired on some machines with a registry torchvision wheel built for
CUDA. That wheel's compiled ops (`torchvision/_C.so`) fail to load on CPU torch, and
`import torchvision` then dies while registering fake kernels for `torchvision::nms` and
`torchvision::qnms`, which takes down `import open_clip`, `import peft` and parts of
`transformers`. vicap uses only torchvision's pure-Python transforms (images are decoded with PIL),
so when the compiled ops cannot load we declare the two op schemas that the import needs. Calling
one of those ops afterwards still fails loudly (there is no kernel); nothing else changes.

`import vicap` installs the guard as an import hook that runs when torchvision is first looked for,
rather than running it (and importing torch) at once: the `vicap` command sets torch's thread and
OpenMP environment first (vicap.runtime), which only works before torch is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_STUB_LIBRARY = None  # keeps the torch.library.Library alive for the life of the process
_GUARDED = False


def torchvision_ops_loadable() -> bool | None:
    """True if torchvision's compiled ops load, False if they fail, None if torchvision is absent."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    libs = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, ImportError, RuntimeError):
        return False
    return True


def guard_torchvision() -> None:
    """Make `import torchvision` survive a torchvision whose compiled ops do not match torch. Idempotent."""
    global _GUARDED, _STUB_LIBRARY
    if _GUARDED or "torchvision" in sys.modules:
        _GUARDED = True
        return
    _GUARDED = True
    if torchvision_ops_loadable() is not False:
        return
    import torch

    log.debug("torchvision's compiled ops do not load on this torch; declaring nms/qnms schemas only")
    _STUB_LIBRARY = torch.library.Library("torchvision", "DEF")
    _STUB_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _STUB_LIBRARY.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")


class _GuardOnFirstLookup(importlib.abc.MetaPathFinder):
    """Runs `guard_torchvision` the first time anything imports or looks up torchvision; finds nothing
    itself. It stays in sys.meta_path (removing a finder while the import system walks the list would
    skip the next one) and is a string comparison per import afterwards."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not _GUARDED:
            guard_torchvision()
        return None


def install_torchvision_guard() -> None:
    """Guard torchvision before its first import, without importing torch now. Idempotent."""
    if _GUARDED or "torchvision" in sys.modules:
        guard_torchvision()  # a no-op that records that there is nothing left to guard
        return
    if not any(isinstance(f, _GuardOnFirstLookup) for f in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnFirstLookup())
