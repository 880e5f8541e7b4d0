"""KTVIC (Vietnamese captions of everyday life), as published::

    root/train_data.json        {"images": [{"id", "filename"}],
    root/test_data.json          "annotations": [{"id", "image_id", "caption", "segment_caption"}]}
    root/train-images/<filename>
    root/public-test-images/<filename>

`segment_caption` (the authors' own segmentation) is ignored: vicap segments
at training time as the recipe says, from the normalized `caption`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage
from data_prep.datasets.jsonio import read_images_annotations
from data_prep.errors import SourceNotFoundError

log = logging.getLogger(__name__)

# split -> (annotation file, image folder)
LAYOUT = {"train": ("train_data.json", "train-images"), "test": ("test_data.json", "public-test-images")}


@register_adapter("ktvic", language="vi")
def read_ktvic(source: Path, *, images: Path | None = None) -> AdapterOutput:
    """KTVIC: train_data.json / test_data.json with train-images/ and public-test-images/."""
    root = Path(source)
    image_root = Path(images) if images else root
    found = [split for split, (name, _) in LAYOUT.items() if (root / name).is_file()]
    if not found:
        raise SourceNotFoundError(f"KTVIC: neither train_data.json nor test_data.json in {root}")
    out = AdapterOutput(meta={"source_files": [LAYOUT[s][0] for s in found]})
    for split, (name, _) in LAYOUT.items():
        if split not in found:
            out.problem("missing_file", name, "-", f"no {name} in {root}; split {split!r} is empty")

    per_split: dict[str, tuple[list[RawImage], list[RawCaption]]] = {}
    for split in found:
        name, folder = LAYOUT[split]
        per_split[split] = read_images_annotations(
            root / name,
            split,
            out,
            lambda e, f=folder: image_root / f / e["filename"],
            filename_key="filename",
        )

    # Ids are only unique within one file in some releases; if train and test share ids,
    # qualify them by split rather than report half the test set as duplicates.
    parts = list(per_split.values())
    scoped = len(parts) == 2 and (
        bool({im.image_id for im in parts[0][0]} & {im.image_id for im in parts[1][0]})
        or bool({c.caption_id for c in parts[0][1]} & {c.caption_id for c in parts[1][1]})
    )
    if scoped:
        log.info("KTVIC: train and test share ids; qualifying ids as 'split/id'")
        out.meta["id_scope"] = "split"
    for split, (ims, caps) in per_split.items():
        for im in ims:
            im.image_id = f"{split}/{im.image_id}" if scoped else im.image_id
        for c in caps:
            if scoped:
                c.image_id, c.caption_id = f"{split}/{c.image_id}", f"{split}/{c.caption_id}"
        out.images += ims
        out.captions += caps
    return out
