"""Captioning image files with a trained run."""

from __future__ import annotations

from pathlib import Path

from vicap.encoders import load_encoder
from vicap.generate import generate_captions
from vicap.images import ImageError, load_image
from vicap.runs import load_run


def caption_images(
    run_dir: str | Path, images: list[str | Path], overrides: list[str] | tuple[str, ...] = ()
) -> list[dict]:
    """One dict per image: {"image", "caption"} or {"image", "error"} for an unreadable file."""
    import torch

    run = load_run(run_dir, overrides)
    recipe = run.recipe
    encoder = load_encoder(recipe.encoder)
    language = recipe.data.language
    results: list[dict] = []
    batch = recipe.generate.batch_size
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        pixels, ok = [], []
        for path in chunk:
            try:
                pixels.append(encoder.preprocess(load_image(path)))
                ok.append(path)
            except ImageError as e:
                results.append({"image": str(path), "error": str(e)})
        if not ok:
            continue
        feats = encoder.encode(torch.stack(pixels))
        caps = generate_captions(
            run.model, feats, recipe.generate, language=language, segment=recipe.data.segment
        )
        results += [{"image": str(p), "caption": c} for p, c in zip(ok, caps, strict=True)]
    order = {str(p): i for i, p in enumerate(images)}
    return sorted(results, key=lambda r: order[r["image"]])
