"""Synthetic coloured shapes: the embedded default dataset (no files, no downloads).

Each image is a single filled shape (circle, square or triangle) in one of four colours, at a
random size and position on a light background; the caption names both, e.g. ``a red circle``.
Train and eval draw from disjoint seeds. A tiny random PaliGemma learns this in a few minutes on
two CPU cores, which is what the README's demo shows. Selected in a recipe by::

    data:
      train:
        - format: shapes
          num_samples: 480

With ``pairs: true`` every sample is a preference pair (the DPO demo): the caption is the chosen
answer and the rejected one names a wrong colour or a wrong shape (``a red circle`` against
``a blue circle`` or ``a red square``), drawn from a stream of its own, so the images are the same
as without pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from pg_tune.config.datasets import ShapesOptions
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats._common import BuildContext
from pg_tune.data.sample import Sample

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(rng: random.Random, size: int) -> tuple[Image.Image, str, str, tuple[int, int, int, int]]:
    """One image, its colour and shape names, and the shape's pixel box (x0, y0, x1, y1)."""
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    side = rng.randint(size // 3, size * 2 // 3)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image, colour, shape, box


def wrong_caption(rng: random.Random, colour: str, shape: str) -> str:
    """A caption that is wrong in exactly one word: the colour or the shape (even odds)."""
    if rng.random() < 0.5:
        return f"a {rng.choice([c for c in sorted(COLOURS) if c != colour])} {shape}"
    return f"a {colour} {rng.choice([s for s in SHAPES if s != shape])}"


def build(options: ShapesOptions, ctx: BuildContext) -> list[Sample]:
    seed = options.seed if options.seed is not None else (0 if ctx.split == "train" else 1)
    rng = random.Random(seed * 1_000_003 + 17)
    rejections = random.Random(seed * 1_000_003 + 29)  # its own stream: the images do not change
    samples = []
    count = options.num_samples if options.limit is None else min(options.num_samples, options.limit)
    for i in range(count):
        image, colour, shape, box = draw_shape(rng, options.image_size)
        samples.append(
            Sample(
                image=image,
                prefix=options.prompt,
                suffix=f"a {colour} {shape}",
                source=f"shapes(seed={seed})[{i}]",
                task="caption",
                meta={"box": box, "colour": colour, "shape": shape},
                rejected=wrong_caption(rejections, colour, shape) if options.pairs else None,
            )
        )
    return samples


def write_jsonl(
    out_dir, num_samples: int = 32, seed: int = 0, prompt: str = "caption en", pairs: bool = False
) -> Path:
    """Write shapes as a real JSONL dataset (PNG files + ``data.jsonl``); returns the JSONL path.
    ``pairs``: preference rows (``chosen``/``rejected`` instead of ``suffix``).

    ``python -m pg_tune.data.formats.shapes OUT_DIR [N] [--seed S]`` does this from the shell, to try
    the ``jsonl`` format without any data of your own; ``--seed 1`` draws the images of the demo's
    eval split (held out from its training images, seed 0).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(split="train", bad_rows=BadRows("stop"))
    rows = build(ShapesOptions(num_samples=num_samples, seed=seed, prompt=prompt, pairs=pairs), ctx)
    path = out_dir / "data.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, sample in enumerate(rows):
            name = f"images/{i:05d}.png"
            sample.image.save(out_dir / name)
            answers = (
                {"chosen": sample.suffix, "rejected": sample.rejected} if pairs else {"suffix": sample.suffix}
            )
            f.write(json.dumps({"image": name, "prefix": sample.prefix, **answers}) + "\n")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write synthetic shapes as a JSONL dataset")
    parser.add_argument("out_dir")
    parser.add_argument("num_samples", nargs="?", type=int, default=32)
    parser.add_argument(
        "--seed", type=int, default=0, help="0: the demo's training images, 1: its eval images"
    )
    args = parser.parse_args()
    print(write_jsonl(args.out_dir, num_samples=args.num_samples, seed=args.seed))
