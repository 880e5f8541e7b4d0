"""Environment guards that must run before open_clip, peft or transformers' vision code import.

The CPU build of torch is paired on some machines with a registry torchvision wheel built for
CUDA. That wheel's compiled ops (`torchvision/_C.so`) fail to load on CPU torch, and
`import torchvision` then dies while registering fake kernels for `torchvision::nms` and
`torchvision::qnms`, which takes down `import open_clip`, `import peft` and parts of
`transformers`. vicap uses only torchvision's pure-Python transforms (images are decoded with PIL),
so when the compiled ops cannot load we declare the two op schemas that the import needs. Calling
one of those ops afterwards still fails loudly (there is no kernel); nothing else changes.
"""

from __future__ import annotations

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
