"""A procedurally drawn product catalogue: photos and captions built from the same attributes.

Every caption states only what is drawn, so a model can learn it from the pixels. Five
categories, each with four or more visible attributes (part colours, patterns, textures,
shapes, markers), placed at varied positions and scales on varied backgrounds.

The catalogue has two parts. `base` is the catalogue the offline profile trains on. `new` is the next
season: products of designs the base part never draws (NEW_DESIGNS), for adapting a trained model to
products it has not seen (profile offline-adapt).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "red": (210, 30, 35),
    "blue": (30, 70, 200),
    "green": (30, 150, 60),
    "yellow": (245, 205, 30),
    "pink": (240, 120, 180),
    "brown": (120, 70, 30),
    "purple": (120, 40, 150),
}
METALS: dict[str, tuple[int, int, int]] = {"silver": (192, 192, 200), "gold": (212, 170, 40)}
LENSES: dict[str, tuple[int, int, int]] = {
    "dark": (35, 35, 45),
    "blue": (60, 110, 220),
    "green": (40, 130, 70),
    "brown": (130, 80, 40),
    "pink": (235, 130, 180),
    "yellow": (240, 200, 40),
}
CATEGORIES = ("watch", "handbag", "t-shirt", "sneaker", "sunglasses")
PARTS = ("base", "new")
# The new part's designs: a value of one attribute that the base part never draws for that category. Each is
# said in words the base part's captions already use (a chain strap is a handbag's, checks are a handbag's,
# lens colours are other parts' colours), so a model trained on the base part has every word it needs: a
# scratch model's vocabulary is its training captions', and an unknown word would be [UNK] to it.
NEW_DESIGNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "watch": ("strap", ("chain strap",)),
    "t-shirt": ("pattern", ("checked",)),
    "sunglasses": ("lens", ("red", "purple", "grey")),
}
NEW_CATEGORIES = tuple(NEW_DESIGNS)


@dataclass(frozen=True)
class Product:
    """One drawn product: its category, attributes, caption and picture."""

    category: str
    attributes: dict[str, str]
    caption: str
    image: Image.Image


class _Canvas:
    """Draws in unit coordinates of a product box placed on the picture."""

    def __init__(self, image: Image.Image, rng: random.Random):
        self.image = image
        self.draw = ImageDraw.Draw(image)
        size = image.width
        scale = rng.uniform(0.78, 0.95) * size
        self.x0 = rng.uniform(0.0, size - scale)
        self.y0 = rng.uniform(0.0, size - scale)
        self.s = scale

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.x0 + x * self.s, self.y0 + y * self.s)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*self.pt(x0, y0), *self.pt(x1, y1)]

    def poly(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.pt(x, y) for x, y in points]

    def width(self, w: float) -> int:
        return max(1, round(w * self.s))

    def fill_pattern(self, shape: Callable[[ImageDraw.ImageDraw], None], base, pattern: str, ink) -> None:
        """Fills a shape (drawn by `shape` into a mask) with a colour and an optional pattern."""
        mask = Image.new("L", self.image.size, 0)
        shape(ImageDraw.Draw(mask))
        fill = Image.new("RGB", self.image.size, base)
        pd = ImageDraw.Draw(fill)
        step = max(4, round(self.s * 0.1))
        if pattern == "striped":
            for y in range(0, self.image.height, step):
                pd.rectangle([0, y, self.image.width, y + step // 2 - 1], fill=ink)
        elif pattern == "dotted":
            r = max(1, step // 4)
            for y in range(step // 2, self.image.height, step):
                for x in range(step // 2, self.image.width, step):
                    pd.ellipse([x - r, y - r, x + r, y + r], fill=ink)
        elif pattern == "checked":
            for y in range(0, self.image.height, step):
                for x in range(0, self.image.width, step):
                    if (x // step + y // step) % 2 == 0:
                        pd.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)
        self.image.paste(fill, (0, 0), mask)


def _pick(rng: random.Random, options, exclude: tuple[str, ...] = ()) -> str:
    return rng.choice([o for o in options if o not in exclude])


def _background(rng: random.Random, size: int) -> Image.Image:
    """A pale backdrop with a soft vertical gradient, as in a studio shot."""
    top = tuple(rng.randint(200, 240) for _ in range(3))
    bottom = tuple(max(0, c - rng.randint(0, 40)) for c in top)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(size):
        t = y / max(1, size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return image


def _watch_attributes(rng: random.Random) -> dict[str, str]:
    a = {
        "strap": rng.choice(["leather strap", "mesh bracelet", "link bracelet", "rubber strap"]),
        "strap_colour": _pick(rng, COLOURS),
        "bezel": _pick(rng, COLOURS),
        "shape": rng.choice(["circular", "square"]),
        "markers": rng.choice(["dot markers", "stick markers", "no markers"]),
    }
    a["dial"] = _pick(rng, COLOURS, exclude=(a["bezel"],))  # a dial the colour of its bezel is invisible
    return a


def _watch(c: _Canvas, a: dict[str, str]) -> None:
    strap_rgb = COLOURS[a["strap_colour"]]
    ink = tuple(max(0, v - 70) if sum(strap_rgb) > 200 else min(255, v + 80) for v in strap_rgb)
    for y0, y1 in ((0.0, 0.3), (0.7, 1.0)):
        c.draw.rectangle(c.box(0.36, y0, 0.64, y1), fill=strap_rgb)
        for i in range(12):  # texture tells the strap material apart
            y = y0 + (y1 - y0) * (i + 0.5) / 12
            if a["strap"] == "mesh bracelet":
                c.draw.line([c.pt(0.36, y), c.pt(0.64, y)], fill=ink, width=1)
                c.draw.line([c.pt(0.36 + 0.28 * i / 12, y0), c.pt(0.36 + 0.28 * i / 12, y1)], fill=ink, width=1)
            elif a["strap"] == "link bracelet" and i % 3 == 0:
                c.draw.line([c.pt(0.36, y), c.pt(0.64, y)], fill=ink, width=c.width(0.02))
            elif a["strap"] == "rubber strap" and i % 3 == 1:
                c.draw.ellipse(c.box(0.47, y - 0.02, 0.53, y + 0.02), fill=ink)
            elif a["strap"] == "chain strap" and i % 2 == 0:  # open links, as the handbags' chain
                c.draw.ellipse(c.box(0.4, y - 0.035, 0.6, y + 0.035), outline=ink, width=c.width(0.015))
        if a["strap"] == "leather strap":
            for x in (0.39, 0.61):
                c.draw.line([c.pt(x, y0), c.pt(x, y1)], fill=ink, width=c.width(0.012))
    outer, inner = c.box(0.2, 0.2, 0.8, 0.8), c.box(0.27, 0.27, 0.73, 0.73)
    shape = c.draw.ellipse if a["shape"] == "circular" else c.draw.rectangle
    shape(outer, fill=COLOURS[a["bezel"]], outline=(60, 60, 60))
    shape(inner, fill=COLOURS[a["dial"]], outline=(60, 60, 60))
    dial_ink = (30, 30, 30) if sum(COLOURS[a["dial"]]) > 380 else (235, 235, 235)
    for k in range(12):
        ang = 2 * math.pi * k / 12
        cx, cy = 0.5 + 0.19 * math.sin(ang), 0.5 - 0.19 * math.cos(ang)
        if a["markers"] == "dot markers":
            c.draw.ellipse(c.box(cx - 0.018, cy - 0.018, cx + 0.018, cy + 0.018), fill=dial_ink)
        elif a["markers"] == "stick markers":
            ix, iy = 0.5 + 0.14 * math.sin(ang), 0.5 - 0.14 * math.cos(ang)
            c.draw.line([c.pt(ix, iy), c.pt(cx, cy)], fill=dial_ink, width=c.width(0.02))
    c.draw.line([c.pt(0.5, 0.5), c.pt(0.5, 0.36)], fill=dial_ink, width=c.width(0.02))
    c.draw.line([c.pt(0.5, 0.5), c.pt(0.6, 0.5)], fill=dial_ink, width=c.width(0.015))


def _watch_caption(a: dict[str, str]) -> str:
    markers = "" if a["markers"] == "no markers" else f" with {a['markers']}"
    return (
        f"a watch with {a['strap_colour']} {a['strap']} and {a['bezel']} bezel "
        f"with {a['shape']} {a['dial']} dial{markers}"
    )


def _handbag_attributes(rng: random.Random) -> dict[str, str]:
    a = {
        "colour": _pick(rng, COLOURS),
        "pattern": rng.choice(["plain", "striped", "dotted", "checked"]),
        "handle": rng.choice(["top handle", "chain strap"]),
        "handle_colour": _pick(rng, COLOURS),
        "clasp": rng.choice(list(METALS)),
    }
    a["pattern_colour"] = _pick(rng, COLOURS, exclude=(a["colour"],))
    return a


def _handbag(c: _Canvas, a: dict[str, str]) -> None:
    body = c.poly([(0.12, 0.42), (0.88, 0.42), (0.95, 0.9), (0.05, 0.9)])
    if a["handle"] == "top handle":
        c.draw.arc(c.box(0.3, 0.18, 0.7, 0.66), 180, 360, fill=COLOURS[a["handle_colour"]], width=c.width(0.06))
    else:
        for i in range(9):
            t = math.pi * i / 8
            x, y = 0.5 - 0.3 * math.cos(t), 0.42 - 0.32 * math.sin(t)
            c.draw.ellipse(c.box(x - 0.03, y - 0.03, x + 0.03, y + 0.03), outline=COLOURS[a["handle_colour"]],
                           width=c.width(0.018))
    ink = COLOURS[a["pattern_colour"]]
    c.fill_pattern(lambda d: d.polygon(body, fill=255), COLOURS[a["colour"]], a["pattern"], ink)
    c.draw.polygon(body, outline=(60, 60, 60))
    c.draw.rectangle(c.box(0.44, 0.5, 0.56, 0.6), fill=METALS[a["clasp"]], outline=(60, 60, 60))


def _handbag_caption(a: dict[str, str]) -> str:
    look = {"plain": f"a plain {a['colour']} handbag", "striped": f"a {a['colour']} handbag with {a['pattern_colour']} stripes",
            "dotted": f"a {a['colour']} handbag with {a['pattern_colour']} dots",
            "checked": f"a {a['colour']} and {a['pattern_colour']} checked handbag"}[a["pattern"]]
    return f"{look} with {a['handle_colour']} {a['handle']} and {a['clasp']} clasp"


def _tshirt_attributes(rng: random.Random) -> dict[str, str]:
    a = {
        "colour": _pick(rng, COLOURS),
        "sleeves": rng.choice(["short", "long"]),
        "pattern": rng.choice(["plain", "striped", "dotted"]),
        "neck": rng.choice(["crew neck", "v neck"]),
    }
    a["pocket"] = _pick(rng, [*COLOURS, "no"], exclude=(a["colour"],))
    a["pattern_colour"] = _pick(rng, COLOURS, exclude=(a["colour"],))
    return a


def _tshirt(c: _Canvas, a: dict[str, str]) -> None:
    sleeve_end = 0.42 if a["sleeves"] == "short" else 0.85
    outline = [(0.3, 0.12), (0.42, 0.12), (0.58, 0.12), (0.7, 0.12), (0.95, sleeve_end - 0.05),
               (0.85, sleeve_end), (0.75, 0.35), (0.75, 0.92), (0.25, 0.92), (0.25, 0.35),
               (0.15, sleeve_end), (0.05, sleeve_end - 0.05)]
    shape = c.poly(outline)
    c.fill_pattern(lambda d: d.polygon(shape, fill=255), COLOURS[a["colour"]], a["pattern"],
                   COLOURS[a["pattern_colour"]])
    c.draw.polygon(shape, outline=(60, 60, 60))
    neck = [(0.42, 0.12), (0.5, 0.3), (0.58, 0.12)] if a["neck"] == "v neck" else None
    if neck:
        c.draw.polygon(c.poly(neck), fill=(60, 60, 60))
    else:
        c.draw.chord(c.box(0.4, 0.04, 0.6, 0.22), 0, 180, fill=(60, 60, 60))
    if a["pocket"] != "no":
        c.draw.rectangle(c.box(0.56, 0.38, 0.68, 0.5), fill=COLOURS[a["pocket"]], outline=(60, 60, 60))


def _tshirt_caption(a: dict[str, str]) -> str:
    pocket = "" if a["pocket"] == "no" else f" and {a['pocket']} pocket"
    if a["pattern"] == "checked":  # the new part's; said as the handbags' checks are
        return (f"a {a['colour']} and {a['pattern_colour']} checked {a['sleeves']} sleeve t-shirt "
                f"with a {a['neck']}{pocket}")
    pattern = {"plain": "", "striped": f" with {a['pattern_colour']} stripes", "dotted": f" with {a['pattern_colour']} dots"}
    return f"a {a['colour']} {a['sleeves']} sleeve t-shirt{pattern[a['pattern']]} with a {a['neck']}{pocket}"


def _sneaker_attributes(rng: random.Random) -> dict[str, str]:
    a = {
        "upper": _pick(rng, COLOURS),
        "height": rng.choice(["low top", "high top"]),
        "sole": _pick(rng, COLOURS),
    }
    a["laces"] = _pick(rng, COLOURS, exclude=(a["upper"],))
    a["stripe"] = _pick(rng, COLOURS, exclude=(a["upper"],))
    return a


def _sneaker(c: _Canvas, a: dict[str, str]) -> None:
    top = 0.25 if a["height"] == "high top" else 0.45
    upper = c.poly([(0.1, 0.78), (0.12, 0.55), (0.3, top), (0.5, top), (0.55, 0.5), (0.9, 0.62), (0.92, 0.78)])
    c.draw.polygon(upper, fill=COLOURS[a["upper"]], outline=(60, 60, 60))
    c.draw.rectangle(c.box(0.06, 0.78, 0.95, 0.9), fill=COLOURS[a["sole"]], outline=(60, 60, 60))
    c.draw.line([c.pt(0.3, 0.74), c.pt(0.72, 0.6)], fill=COLOURS[a["stripe"]], width=c.width(0.06))
    for i in range(4):
        x = 0.36 + 0.05 * i
        y = top + 0.05 + 0.06 * i
        c.draw.line([c.pt(x - 0.04, y), c.pt(x + 0.08, y + 0.03)], fill=COLOURS[a["laces"]], width=c.width(0.03))


def _sneaker_caption(a: dict[str, str]) -> str:
    return (f"a {a['upper']} {a['height']} sneaker with {a['sole']} sole "
            f"and {a['laces']} laces and a {a['stripe']} stripe")


def _sunglasses_attributes(rng: random.Random) -> dict[str, str]:
    a = {
        "shape": rng.choice(["round", "square", "aviator"]),
        "frame": _pick(rng, COLOURS),
        "lens": _pick(rng, LENSES),
        "arms": _pick(rng, COLOURS),
    }
    return a


def _sunglasses(c: _Canvas, a: dict[str, str]) -> None:
    frame = COLOURS[a["frame"]]
    lens = LENSES.get(a["lens"]) or COLOURS[a["lens"]]  # the new part's lenses take a colour of COLOURS
    for x0 in (0.08, 0.54):
        box = c.box(x0, 0.35, x0 + 0.38, 0.68)
        if a["shape"] == "round":
            c.draw.ellipse(box, fill=lens, outline=frame, width=c.width(0.04))
        elif a["shape"] == "square":
            c.draw.rectangle(box, fill=lens, outline=frame, width=c.width(0.04))
        else:
            drop = c.poly([(x0, 0.35), (x0 + 0.38, 0.35), (x0 + 0.34, 0.6), (x0 + 0.19, 0.72), (x0 + 0.04, 0.6)])
            c.draw.polygon(drop, fill=lens, outline=frame, width=c.width(0.04))
    c.draw.line([c.pt(0.46, 0.42), c.pt(0.54, 0.42)], fill=frame, width=c.width(0.04))
    for x0, x1 in ((0.08, 0.0), (0.92, 1.0)):
        c.draw.line([c.pt(x0, 0.38), c.pt(x1, 0.3)], fill=COLOURS[a["arms"]], width=c.width(0.05))


def _sunglasses_caption(a: dict[str, str]) -> str:
    return f"a pair of {a['shape']} sunglasses with {a['frame']} frame and {a['lens']} lenses and {a['arms']} arms"


_DRAWERS = {
    "watch": (_watch_attributes, _watch, _watch_caption),
    "handbag": (_handbag_attributes, _handbag, _handbag_caption),
    "t-shirt": (_tshirt_attributes, _tshirt, _tshirt_caption),
    "sneaker": (_sneaker_attributes, _sneaker, _sneaker_caption),
    "sunglasses": (_sunglasses_attributes, _sunglasses, _sunglasses_caption),
}


def draw_product(seed: int, index: int, size: int, changes: Mapping[str, str] | None = None,
                 backdrop: tuple[int, int, int] | None = None, part: str = "base") -> Product:
    """Draws item `index` of the catalogue part (`base` or `new`) seeded by `seed`; the same arguments give the
    same product.

    `changes` sets some of its attributes (e.g. {"strap_colour": "red"}) and `backdrop` puts it on a flat
    background of that colour; everything else (placement, scale, other attributes) stays as drawn, so
    one factor can be varied at a time. A `new` item is a product of one of NEW_DESIGNS, drawn from its own
    random stream: no base item shares its placement or its other attributes."""
    if part not in PARTS:
        raise ValueError(f"a catalogue part is one of {PARTS}, not {part!r}")
    rng = random.Random(f"{seed}:{index}" if part == "base" else f"{seed}:new:{index}")
    categories = CATEGORIES if part == "base" else NEW_CATEGORIES
    category = categories[index % len(categories)]
    image = _background(rng, size)
    if backdrop is not None:
        image = Image.new("RGB", (size, size), backdrop)
    canvas = _Canvas(image, rng)
    choose, draw, caption = _DRAWERS[category]
    attributes = choose(rng)
    if part == "new":
        name, values = NEW_DESIGNS[category]
        attributes[name] = rng.choice(values)
    unknown = set(changes or {}) - set(attributes)
    if unknown:
        raise ValueError(f"a {category} has no attribute {sorted(unknown)}; it has {sorted(attributes)}")
    attributes.update(changes or {})
    draw(canvas, attributes)
    return Product(category, attributes, caption(attributes), image)


def catalogue(seed: int, items: int, size: int, part: str = "base") -> Iterator[Product]:
    """Yields `items` products of the catalogue part seeded by `seed`, cycling through its categories."""
    for index in range(items):
        yield draw_product(seed, index, size, part=part)
