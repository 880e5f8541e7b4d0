"""Karpathy-split JSON: ``dataset_coco.json``, ``dataset_flickr8k.json``, ``dataset_flickr30k.json``.

``{"dataset": "coco", "images": [{"filepath"?, "filename", "split", "imgid", "cocoid"?,
"sentences": [{"raw", "tokens", "sentid"}]}]}``. Split "restval" counts as train
(as in Karpathy's and ClipCap's training). Captions come from ``raw``; the
pre-lowercased ``tokens`` are ignored so normalization is ours.

Images: ``--images`` is the folder that ``filepath/filename`` (COCO: ``train2014/...``)
or ``filename`` (Flickr) is relative to.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.datasets import register_adapter
from data_prep.datasets.base import AdapterOutput, RawCaption, RawImage
from data_prep.datasets.jsonio import load_json
from data_prep.errors import SourceError, SourceNotFoundError

SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@register_adapter("karpathy", language="en")
def read_karpathy(source: Path, *, images: Path | None = None) -> AdapterOutput:
    """Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json)."""
    source = Path(source)
    if source.is_dir():
        found = sorted(source.glob("dataset_*.json"))
        if len(found) != 1:
            raise SourceNotFoundError(
                f"expected one dataset_*.json in {source}, found {len(found)}; pass the file"
            )
        source = found[0]
    image_root = Path(images) if images else source.parent
    name = source.name
    data = load_json(source)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{source}: expected an object with an 'images' list (Karpathy split format)")
    out = AdapterOutput(meta={"source_files": [name], "karpathy_dataset": data.get("dataset", "")})
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str):
            out.problem("bad_entry", name, f"images[{i}]", f"needs 'filename': {img!r}")
            continue
        # cocoid is COCO's own image id; Flickr has none, its file stem is the usual id.
        image_id = str(img["cocoid"]) if "cocoid" in img else Path(img["filename"]).stem
        where = f"images[{i}] {img['filename']}"
        split = SPLITS.get(img.get("split", ""))  # unknown split -> None -> reported as no_split
        path = image_root / img.get("filepath", "") / img["filename"]
        out.images.append(RawImage(image_id, path, split, name, where))
        for k, sent in enumerate(img.get("sentences", [])):
            if not isinstance(sent, dict):
                out.problem("bad_entry", name, f"{where} sentences[{k}]", f"not an object: {sent!r}")
                continue
            sent_id = str(sent.get("sentid", f"{image_id}#{k}"))
            out.captions.append(RawCaption(sent_id, image_id, sent.get("raw"), name, f"sentid {sent_id}"))
    return out
