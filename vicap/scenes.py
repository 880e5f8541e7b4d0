"""A harder synthetic Vietnamese captioning set: scenes of 2-4 things with relations between them.

`vicap demo`'s shapes (one kind of shape, one colour, a count and a place per image, seven templates)
are saturated: a tiny captioner scores above the human leave-one-out row, so no quality change shows.
Here every image holds 2-4 things, each a shape with its own colour, a size and a texture (plain,
striped, dotted), on a plain or cluttered background. Two of them are related (left of, above,
inside, bigger than, partly covering) and drawn so that the relation is plain to see; the others
stay clear of those two and may partly cover one another. Each of the five captions names the
related pair and says a different part of the scene besides (the relation; the count and colours;
the background; the textures; the sizes; all the things), each part in several wordings and word
orders, so a captioner has to see more than one sentence can say: the benchmark of
`vicap demo --dataset hard` and `bench/quality.py`.

Deterministic from a seed; written in KTVIC's layout by the demo's writer
(`vicap.demo.write_ktvic_layout`) and read back through the `ktvic` adapter. The vocabulary is closed
and small, so the tiny stand-in models can learn it.
"""

from __future__ import annotations

import math
import random
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
    "hồng": (240, 110, 170),
    "nâu": (130, 80, 35),
}
BACKGROUNDS = {"trắng": (244, 244, 244), "xám": (128, 128, 128), "đen": (20, 20, 20)}
# the pentagon and hexagon are near circles at the small size: a fine distinction to see
SHAPES = ("hình tròn", "hình vuông", "hình tam giác", "hình thoi", "hình ngũ giác", "hình lục giác")
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
    "covers": ("{x} che một phần {y}", "{x} nằm đè lên {y}", "{y} bị {x} che một phần", "{y} bị {x} đè lên"),
}
# Word lists kept together so the caption vocabulary is closed; KTVIC ships underthesea-style word
# segmentation beside each caption, so its compounds are listed instead of running it.
COMPOUNDS = (
    "hình tam giác",
    "hình tròn",
    "hình vuông",
    "hình thoi",
    "hình ngũ giác",
    "hình lục giác",
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
    "hoa văn",
    "lộn xộn",
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


def _outline(t: Thing) -> list[tuple[float, float]]:
    r, cx, cy = t.r, t.cx, t.cy
    if t.shape == "hình vuông":
        s = 0.88 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if t.shape == "hình tam giác":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if t.shape == "hình thoi":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    # regular polygons, a corner at the top: 32 corners draw the circle
    n = {"hình ngũ giác": 5, "hình lục giác": 6}.get(t.shape, 32)
    return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (2 * math.pi * i / n for i in range(n))]


def mask(t: Thing):
    """The pixels of a thing's outline as drawn (a PIL "L" image, 255 inside)."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(image).polygon(_outline(t), fill=255)
    return image


def visible(things: list[Thing] | tuple[Thing, ...]) -> list[float]:
    """The share of each thing's pixels left in sight by the things drawn after it (later covers earlier)."""
    import numpy as np

    masks = [np.asarray(mask(t)) > 0 for t in things]
    above, shares = np.zeros((SIZE, SIZE), bool), []
    for m in reversed(masks):
        shares.append((m & ~above).sum() / m.sum())
        above |= m
    return shares[::-1]


def _partly_covers(x: Thing, y: Thing) -> bool:
    """Whether x, drawn over y, plainly hides a part of it but neither hides y nor sits inside it: on the
    drawn outlines, not circles (a corner may miss what a circle would touch)."""
    import numpy as np

    mx, my = (np.asarray(mask(t)) > 0 for t in (x, y))
    hidden = (mx & my).sum()
    return 0.15 * min(mx.sum(), my.sum()) <= hidden <= min(0.5 * my.sum(), 0.7 * mx.sum())


def _pair(rng: random.Random, relation: str, kinds: list[tuple[str, str]]) -> tuple[Thing, Thing]:
    """The two related things x, y (x <relation> y), placed so the relation is plain to see; x is drawn
    after y."""
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
        y = Thing(ys, yc, tex[1], sizes[1], *(rng.uniform(ry + 1, SIZE - ry - 1) for _ in "xy"), ry)
        if relation == "covers":  # x within reach of y: a chance worth trying
            a, d = rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 1.0) * (rx + ry)
            x = Thing(xs, xc, tex[0], sizes[0], y.cx + d * math.cos(a), y.cy + d * math.sin(a), rx)
            if not (rx + 1 < x.cx < SIZE - rx - 1 and rx + 1 < x.cy < SIZE - rx - 1):
                continue
        else:
            x = Thing(xs, xc, tex[0], sizes[0], *(rng.uniform(rx + 1, SIZE - rx - 1) for _ in "xy"), rx)
        dx, dy = y.cx - x.cx, y.cy - x.cy
        gap = math.hypot(dx, dy) - rx - ry
        ok = {
            "left": dx > rx + ry + 2 and abs(dy) < 0.5 * dx,
            "above": dy > rx + ry + 2 and abs(dx) < 0.5 * dy,
            "bigger": gap > 3,
            "covers": gap < 0 and _partly_covers(x, y),
        }[relation]
        if ok:
            return x, y
    raise AssertionError(f"could not place a {relation} pair")  # 200 tries always suffice at these sizes


def _add_other(rng: random.Random, shape: str, colour: str, things: list[Thing], pair: tuple[Thing, Thing]):
    """Add a thing that is not one of the related pair to `things` (drawing order), if 200 tries find it
    a place: clear of the pair (it never hides their relation), drawn under or over the other such
    things, partly covering them or covered, but every thing keeps at least half its pixels in sight."""
    size = rng.choice(list(SIZES))
    r = _radius(rng, size)
    texture = rng.choice(TEXTURES)
    for _ in range(200):
        t = Thing(shape, colour, texture, size, rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r), r)
        if any(_overlap(t, p, 2) for p in pair):
            continue
        trial = list(things)
        trial.insert(rng.randint(0, len(things)), t)
        if min(visible(trial)) >= 0.5:
            things[:] = trial
            return


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice((2, 3, 3, 4))
    # every thing has its own colour, so "hình tròn đỏ" names exactly one thing and none hides in another
    kinds = [(rng.choice(SHAPES), c) for c in rng.sample(list(COLOURS), n)]
    relation = rng.choice(RELATIONS)
    x, y = _pair(rng, relation, kinds[:2])
    things = [y, x]  # y first: a covering or contained x is drawn on top
    for shape, colour in kinds[2:]:
        # a scene too crowded for one more keeps the things it has (the captions count what is drawn)
        _add_other(rng, shape, colour, things, (x, y))
    return Scene(
        tuple(things),
        relation,
        things.index(x),
        things.index(y),
        rng.choice(list(BACKGROUNDS)),
        rng.random() < 0.5,
    )


# --------------------------------------------------------------------------- drawing


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
        image.paste(layer, (0, 0), mask(t))
    return image


# --------------------------------------------------------------------------- captions


def name(t: Thing) -> str:
    """The short name of a thing: its shape and colour ("hình tròn đỏ"), unique within a scene."""
    return f"{t.shape} {t.colour}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " và " + parts[-1]


def _capital(s: str) -> str:
    return s[0].upper() + s[1:]


def _pair_names(scene: Scene, rng: random.Random) -> tuple[Thing, Thing]:
    """The related pair in either order (word-order variation)."""
    x, y = scene.things[scene.a], scene.things[scene.b]
    return (x, y) if rng.random() < 0.5 else (y, x)


def _background(scene: Scene, rng: random.Random) -> str:
    bg = f"nền {scene.background}"
    if scene.clutter:
        return bg + rng.choice((" có nhiều vệt nhỏ", " lộn xộn", " có nhiều nét vụn"))
    return bg + rng.choice((" trơn", ""))


def _relation(scene: Scene, rng: random.Random) -> str:
    x, y = scene.things[scene.a], scene.things[scene.b]
    phrase = rng.choice(PHRASES[scene.relation]).format(x=name(x), y=name(y))
    return rng.choice(("{p}.", "Trong bức ảnh, {p}.", "{p} trên {bg}.", "Trên {bg}, {p}.")).format(
        p=phrase, bg=_background(scene, rng)
    )


def _colours(scene: Scene, rng: random.Random) -> str:
    p, q = _pair_names(scene, rng)
    n = NUMBERS[len(scene.things)]
    colours = _join([t.colour for t in rng.sample(scene.things, len(scene.things))])
    if len(scene.things) == 2:
        template = rng.choice(
            (
                "Có hai hình: {p} và {q}.",
                "Bức ảnh có hai hình là {p} và {q}.",
                "Chỉ có hai hình là {p} và {q}.",
            )
        )
    else:
        template = rng.choice(
            (
                "Có {n} hình màu {c}, trong đó có {p} và {q}.",
                "Bức ảnh có {n} hình với các màu {c}, gồm cả {p} và {q}.",
                "{P} và {q} là hai trong {n} hình màu {c}.",
            )
        )
    return template.format(n=n, c=colours, p=name(p), P=_capital(name(p)), q=name(q))


def _scene_background(scene: Scene, rng: random.Random) -> str:
    p, q = _pair_names(scene, rng)
    return rng.choice(
        ("Trên {bg} là {p} và {q}.", "{P} và {q} nằm trên {bg}.", "Bức ảnh có {p} và {q} trên {bg}.")
    ).format(bg=_background(scene, rng), p=name(p), P=_capital(name(p)), q=name(q))


def _list(parts: list[str], rng: random.Random) -> str:
    """A caption that lists things: "Có ...", "Bức ảnh có ..." or the bare list."""
    return rng.choice(("Có {l}.", "Bức ảnh có {l}.", "{L}.")).format(l=_join(parts), L=_capital(_join(parts)))


def _textures(scene: Scene, rng: random.Random) -> str:
    def texture(t: Thing) -> str:
        if t.texture == "trơn":
            return rng.choice(("", " trơn", " không có hoa văn"))
        return rng.choice((f" {t.texture}", f" có hoa văn {t.texture}"))

    return _list([f"một {name(t)}{texture(t)}" for t in _pair_names(scene, rng)], rng)


def _sizes(scene: Scene, rng: random.Random) -> str:
    words = ("một {s} {z} màu {c}", "một {s} {c} cỡ {z}")
    return _list(
        [rng.choice(words).format(s=t.shape, z=t.size, c=t.colour) for t in _pair_names(scene, rng)], rng
    )


def _all(scene: Scene, rng: random.Random) -> str:
    parts = _join([f"một {name(t)}" for t in rng.sample(scene.things, len(scene.things))])
    return rng.choice(("Bức ảnh có {p}.", "Hình ảnh gồm {p}.", "{P} trên {bg}.")).format(
        p=parts, P=_capital(parts), bg=_background(scene, rng)
    )


ASPECTS = (_colours, _scene_background, _textures, _sizes, _all)


def captions_for(scene: Scene, rng: random.Random) -> list[str]:
    """Five captions, each saying a different part of the scene, all naming the related pair: the
    relation and four of the others (in random order)."""
    captions = [_capital(f(scene, rng)) for f in (_relation, *rng.sample(ASPECTS, 4))]
    return rng.sample(captions, 5)


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
