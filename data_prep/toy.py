"""Write a small ImageNet-style folder of real JPEGs whose content depends on the class.

    python -m data_prep.toy --out DIR [--classes 10] [--per-class 20] [--size 64] [--seed 0]

Writes ``DIR/train/n0000000C/n0000000C_I.JPEG``. Class c has its own colour (classes 0-9: ten evenly
spaced hues), background tint (far from those of the classes of neighbouring colour) and shape (circle,
square, triangle, ring, cross, diamond, hexagon, bar, repeating after eight classes); each picture has
1-3 shapes at random positions and sizes, a random aspect ratio (short side = --size) and mild pixel noise.
Output is identical for the same arguments.
"""
from __future__ import annotations

import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond", "hexagon", "bar")
ASPECTS = ((1, 1), (4, 3), (3, 4))


def _polygon(cx, cy, r, sides, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
            for k in range(sides)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx, cy, r, angle, colour):
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, r, 4, math.pi / 4), fill=colour)
    elif kind == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=colour)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=colour)
    elif kind == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, angle), fill=colour)
    elif kind == "cross":
        w = max(2, int(r / 2.5))
        draw.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=colour)
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=colour)
    elif kind == "bar":
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=max(2, int(r / 3)))


def _rgb(h, s, v):
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def toy_image(c: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One picture of class c."""
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    w, h = (size * aw // min(aw, ah), size * ah // min(aw, ah))
    hue = 0.3 * c + 0.05 * (c // 10)  # classes 0-9: ten hues 0.1 apart; the next ten halfway between them
    # the background's hue moves 0.3 for every 0.1 of the shapes' hue: classes whose shapes have neighbouring
    # colours get distant backgrounds
    img = Image.new("RGB", (w, h), _rgb(3 * hue + 0.5, 0.25, rng.uniform(0.55, 0.85)))
    draw = ImageDraw.Draw(img)
    kind = SHAPES[c % len(SHAPES)]
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(0.12, 0.3) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        _draw_shape(draw, kind, cx, cy, r, rng.uniform(0, 2 * math.pi),
                    _rgb(hue + rng.normal(0, 0.02), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.toy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write OUT/<class>/*.JPEG into")
    p.add_argument("--classes", type=int, default=10, help="number of class folders")
    p.add_argument("--per-class", type=int, default=20, help="pictures per class")
    p.add_argument("--size", type=int, default=64, help="short side of each picture in pixels")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same pictures")
    args = p.parse_args(argv)
    for c in range(args.classes):
        wnid = f"n{c:08d}"
        folder = args.out / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            rng = np.random.default_rng([args.seed, c, i])
            toy_image(c, rng, args.size).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    print(f"wrote {args.classes * args.per_class} JPEGs in {args.classes} classes to {args.out / 'train'}")


if __name__ == "__main__":
    main()
