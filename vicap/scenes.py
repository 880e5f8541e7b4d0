"""A harder synthetic Vietnamese captioning set: scenes of 2-4 things with relations between them.

`vicap demo`'s shapes (one kind of shape, one colour, a count and a place per image, seven templates)
are saturated: a tiny captioner scores above the human leave-one-out row, so no quality change shows.
Here every image holds 2-4 things, each a shape with a colour, a size and a texture (plain, striped,
dotted), on a plain or cluttered background; two of them are linked by a relation (left of, above,
inside, bigger than, partly covering) and the others may overlap them. Its five captions each say a
different part of the scene (the relation, the colours and how many, the shapes, the background, the
textures, the sizes, the whole list), each part in several wordings, so a captioner has to see far
more than it can say in one sentence: the benchmark of `vicap demo --dataset hard` and
`bench/quality.py`.

Deterministic from a seed; written in KTVIC's layout by the demo's writer (`vicap.demo.write_ktvic_layout`)
and read back through the `ktvic` adapter. The vocabulary is closed and small (`vocabulary()`), so tiny
stand-in models can learn it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SIZE = 96  # pixels; the stand-in CLIP sees 64
COLOURS = {  # Vietnamese colour name -> RGB
    "đỏ": (215, 38, 38),
    "cam": (245, 130, 20),
    "vàng": (235, 205, 30),
    "xanh lá": (40, 165, 60),
    "xanh dương": (35, 75, 215),
    "tím": (140, 55, 185),
}
BACKGROUNDS = {"trắng": (244, 244, 244), "xám": (128, 128, 128), "đen": (20, 20, 20)}
SHAPES = ("hình tròn", "hình vuông", "hình tam giác", "hình thoi")
TEXTURES = ("trơn", "kẻ sọc", "chấm bi")  # trơn: plain
SIZES = {"lớn": (0.15, 0.19), "nhỏ": (0.075, 0.095)}  # radius as a fraction of the image side
NUMBERS = ("không", "một", "hai", "ba", "bốn")
RELATIONS = ("left", "above", "inside", "bigger", "covers")

# Relation phrases: "{x} ... {y}" always says "x <kind> y" (x is left of / above / inside / bigger than /
# partly covering y), whatever the word order; tests render every phrase for every pair of things and
# check the drawn geometry of each one that a caption contains.
PHRASES = {
    "left": ("{x} nằm bên trái {y}", "{y} nằm bên phải {x}", "{x} ở bên trái {y}", "{y} ở bên phải {x}"),
    "above": ("{x} nằm phía trên {y}", "{y} nằm phía dưới {x}", "{x} ở phía trên {y}", "{y} ở phía dưới {x}"),
    "inside": (
        "{x} nằm bên trong {y}",
        "{x} nằm gọn trong {y}",
        "{y} chứa {x} ở giữa",
        "bên trong {y} là {x}",
    ),
    "bigger": ("{x} lớn hơn {y}", "{y} nhỏ hơn {x}", "{x} to hơn {y}", "{y} bé hơn {x}"),
    "covers": ("{x} che một phần {y}", "{x} nằm đè lên {y}", "{y} bị {x} che một phần", "{y} nằm dưới {x}"),
}
# Word lists kept together so the caption vocabulary is closed; KTVIC ships underthesea-style word
# segmentation beside each caption, so its compounds are listed (longest first) instead of running it.
COMPOUNDS = (
    "hình tam giác",
    "hình tròn",
    "hình vuông",
    "hình thoi",
    "xanh lá",
    "xanh dương",
    "bức ảnh",
    "hình ảnh",
    "kẻ sọc",
    "chấm bi",
    "bên trái",
    "bên phải",
    "bên trong",
    "phía trên",
    "phía dưới",
    "một phần",
)


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    texture: str
    size: str  # "lớn" / "nhỏ"
    cx: float  # centre and radius, in pixels
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]  # in drawing order: later things cover earlier ones
    relation: str  # things[a] <relation> things[b]
    a: int
    b: int
    background: str
    clutter: bool


# --------------------------------------------------------------------------- sampling


def _radius(rng: random.Random, size: str) -> float:
    lo, hi = SIZES[size]
    return rng.uniform(lo, hi) * SIZE


def _overlap(p: Thing, q: Thing, slack: float = 1.0) -> bool:
    return math.hypot(p.cx - q.cx, p.cy - q.cy) < p.r + q.r + slack


def _pair(rng: random.Random, relation: str, kinds: list[tuple[str, str]]) -> tuple[Thing, Thing]:
    """The two related things x, y (x <relation> y), placed so the relation is plain to see."""
    (xs, xc), (ys, yc) = kinds
    tex = [rng.choice(TEXTURES) for _ in range(2)]
    if relation == "inside":
        # y is a big container, x a small thing at its incentre (a triangle's sits below its middle)
        ry = rng.uniform(0.22, 0.26) * SIZE
        cx, cy = rng.uniform(ry + 2, SIZE - ry - 2), rng.uniform(ry + 2, SIZE - ry - 2)
        y = Thing(ys, yc, tex[1], "lớn", cx, cy, ry)
        dy = 0.21 * ry if ys == "hình tam giác" else 0.0
        return Thing(xs, xc, "trơn", "nhỏ", cx, cy + dy, rng.uniform(0.3, 0.35) * ry), y
    sizes = ("lớn", "nhỏ") if relation == "bigger" else (rng.choice(list(SIZES)), rng.choice(list(SIZES)))
    rx, ry = _radius(rng, sizes[0]), _radius(rng, sizes[1])
    for _ in range(200):
        x = Thing(xs, xc, tex[0], sizes[0], *(rng.uniform(rx + 1, SIZE - rx - 1) for _ in "xy"), rx)
        y = Thing(ys, yc, tex[1], sizes[1], *(rng.uniform(ry + 1, SIZE - ry - 1) for _ in "xy"), ry)
        dx, dy = y.cx - x.cx, y.cy - x.cy
        gap = math.hypot(dx, dy) - rx - ry
        ok = {
            "left": dx > rx + ry + 2 and abs(dy) < 0.5 * dx,
            "above": dy > rx + ry + 2 and abs(dx) < 0.5 * dy,
            "bigger": gap > 3,
            "covers": -0.9 * min(rx, ry) < gap < -0.3 * min(rx, ry),
        }[relation]
        if ok:
            return x, y
    raise AssertionError(f"could not place a {relation} pair")  # 200 tries always suffice at these sizes


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice((2, 3, 3, 4))
    # every thing has its own colour, so "hình tròn đỏ" names exactly one thing and none hides in another
    kinds = [(rng.choice(SHAPES), c) for c in rng.sample(list(COLOURS), n)]
    relation = rng.choice(RELATIONS)
    x, y = _pair(rng, relation, kinds[:2])
    # y first, then x: a covering or contained x is drawn on top
    things = [y, x]
    for shape, colour in kinds[2:]:
        size = rng.choice(list(SIZES))
        r = _radius(rng, size)
        for _ in range(200):
            t = Thing(
                shape,
                colour,
                rng.choice(TEXTURES),
                size,
                rng.uniform(r, SIZE - r),
                rng.uniform(r, SIZE - r),
                r,
            )
            # others may overlap each other a little (occlusion), never hide the pair's relation
            if not any(_overlap(t, p, 2) for p in (x, y)) and not any(
                math.hypot(t.cx - p.cx, t.cy - p.cy) < 0.6 * (t.r + p.r) for p in things[2:]
            ):
                break
        things.insert(rng.randint(0, len(things)) if rng.random() < 0.5 else len(things), t)
    return Scene(
        tuple(things),
        relation,
        things.index(x),
        things.index(y),
        rng.choice(list(BACKGROUNDS)),
        rng.random() < 0.5,
    )


# --------------------------------------------------------------------------- drawing


def _outline(t: Thing) -> list[tuple[float, float]]:
    r, cx, cy = t.r, t.cx, t.cy
    if t.shape == "hình vuông":
        s = 0.88 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if t.shape == "hình tam giác":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if t.shape == "hình thoi":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (2 * math.pi * i / 32 for i in range(32))]


def draw_scene(scene: Scene, rng: random.Random):
    from PIL import Image, ImageDraw

    bg = BACKGROUNDS[scene.background]
    image = Image.new("RGB", (SIZE, SIZE), bg)
    draw = ImageDraw.Draw(image)
    if scene.clutter:  # short grey strokes and specks all over the background
        for _ in range(rng.randint(14, 22)):
            x, y = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
            a, n = rng.uniform(0, math.pi), rng.uniform(3, 9)
            grey = (int(0.5 * bg[0] + 0.5 * rng.randint(40, 215)),) * 3
            draw.line((x, y, x + n * math.cos(a), y + n * math.sin(a)), fill=grey, width=rng.choice((1, 2)))
    ink = (25, 25, 25) if scene.background == "trắng" else (245, 245, 245)  # stripes and dots
    for t in scene.things:
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[t.colour])
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).polygon(_outline(t), fill=255)
        layer = Image.new("RGB", (SIZE, SIZE), fill)
        pattern = ImageDraw.Draw(layer)
        if t.texture == "kẻ sọc":
            step = 6
            for k in range(-SIZE, SIZE, step):
                pattern.line((k, 0, k + SIZE, SIZE), fill=ink, width=2)
        elif t.texture == "chấm bi":
            step = 6
            for i in range(0, SIZE, step):
                for j in range(0, SIZE, step):
                    pattern.ellipse((i + 1, j + 1, i + 3.5, j + 3.5), fill=ink)
        image.paste(layer, (0, 0), mask)
    return image


# --------------------------------------------------------------------------- captions


def name(t: Thing) -> str:
    """The short name of a thing: its shape and colour ("hình tròn đỏ"), unique within a scene."""
    return f"{t.shape} {t.colour}"


def _texture(t: Thing) -> str:
    return "" if t.texture == "trơn" else f" {t.texture}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " và " + parts[-1]


def _capital(s: str) -> str:
    return s[0].upper() + s[1:]


def _background(scene: Scene, rng: random.Random) -> str:
    bg = f"nền {scene.background}"
    if scene.clutter:
        return bg + rng.choice((" có nhiều vệt nhỏ", " lộn xộn"))
    return bg + rng.choice((" trơn", ""))


def _relation(scene: Scene, rng: random.Random) -> str:
    x, y = scene.things[scene.a], scene.things[scene.b]
    phrase = rng.choice(PHRASES[scene.relation]).format(x=name(x), y=name(y))
    return rng.choice(("{p}.", "Trong bức ảnh, {p}.", "{p} trên {bg}.", "Trên {bg}, {p}.")).format(
        p=phrase, bg=_background(scene, rng)
    )


def _colours(scene: Scene, rng: random.Random) -> str:
    x, y = scene.things[scene.a], scene.things[scene.b]
    n, colours = NUMBERS[len(scene.things)], _join([t.colour for t in scene.things])
    if len(scene.things) == 2:
        return rng.choice(("Có hai hình: {x} và {y}.", "Bức ảnh có hai hình là {x} và {y}.")).format(
            x=name(x), y=name(y)
        )
    return rng.choice(
        (
            "Có {n} hình màu {c}, trong đó có {x} và {y}.",
            "Bức ảnh có {n} hình với các màu {c}, gồm {x} và {y}.",
        )
    ).format(n=n, c=colours, x=name(x), y=name(y))


def _scene_background(scene: Scene, rng: random.Random) -> str:
    x, y = scene.things[scene.a], scene.things[scene.b]
    return rng.choice(
        (
            "Trên {bg} là {x} và {y}.",
            "{X} và {y} nằm trên {bg}.",
            "Bức ảnh có {x} và {y} trên {bg}.",
        )
    ).format(bg=_background(scene, rng), x=name(x), X=_capital(name(x)), y=name(y))


def _textures(scene: Scene, rng: random.Random) -> str:
    x, y = scene.things[scene.a], scene.things[scene.b]
    parts = [f"một {name(t)}{_texture(t)}" for t in (x, y)]
    return rng.choice(("Có {p}.", "Bức ảnh có {p}.", "{P}.")).format(p=_join(parts), P=_capital(_join(parts)))


def _sizes(scene: Scene, rng: random.Random) -> str:
    x, y = scene.things[scene.a], scene.things[scene.b]
    parts = [f"một {t.shape} {t.size} màu {t.colour}" for t in (x, y)]
    return rng.choice(("Có {p}.", "Bức ảnh có {p}.", "{P}.")).format(p=_join(parts), P=_capital(_join(parts)))


def _all(scene: Scene, rng: random.Random) -> str:
    parts = _join([f"một {name(t)}" for t in scene.things])
    return rng.choice(("Bức ảnh có {p}.", "Hình ảnh gồm {p}.", "{P} trên {bg}.")).format(
        p=parts, P=_capital(parts), bg=_background(scene, rng)
    )


ASPECTS = (_colours, _scene_background, _textures, _sizes, _all)


def captions_for(scene: Scene, rng: random.Random) -> list[str]:
    """Five captions, each saying a different part of the scene: the relation and four others."""
    return [_capital(f(scene, rng)) for f in (_relation, *rng.sample(ASPECTS, 4))]


def scene_example(rng: random.Random):
    """One image and its five captions (the example function of `vicap.demo.write_ktvic_layout`)."""
    scene = random_scene(rng)
    return draw_scene(scene, rng), captions_for(scene, rng)


def write_scenes_ktvic(root: Path, n_train: int = 3000, n_test: int = 300, seed: int = 0) -> Path:
    """The set in KTVIC's layout: {train,test}_data.json + train-images/, public-test-images/."""
    from vicap.demo import segment_caption, write_ktvic_layout

    return write_ktvic_layout(
        root,
        n_train,
        n_test,
        seed=seed,
        example=scene_example,
        segment=lambda c: segment_caption(c, COMPOUNDS),
    )
