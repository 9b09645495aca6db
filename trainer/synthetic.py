"""Deterministic synthetic image+text posts whose labels need both modalities.

Each post is a scene (sunny or gloomy background, one large shape in red or blue/green)
and a sentence naming a shape with a mood (praise, complaint, hostile). The labels depend
on the relation between the two:

- sarcasm: `sarcastic` iff the text praises the weather AND the image is gloomy;
- hate: `hateful` iff the text is hostile AND the shape is red (the "group symbol");
  hostile text over a blue/green shape is a benign confounder.

The distributions are chosen so each label is about 34% positive while neither modality
alone gets far: text alone tops out near 89% accuracy on either task (it cannot see the
background or colour), the image alone is no better than the majority class (about 66%),
and the pair determines the label exactly. With probability `mismatch_rate` the text names
a shape other than the one drawn: a weak image-text pair for the ITM head and the review
route, labelled by the same rules.

Everything is drawn from a generator seeded by (seed, index), so a run is byte-identical
for the same parameters and a smaller `n` yields a prefix of a larger one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from models.tasks import DEFAULT_TASKS
from modstream.manifest import Example, read_manifest, write_manifest

# Bump when drawing or sampling changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (35, 75, 215),
    "green": (35, 165, 65),
}
BACKGROUNDS: tuple[str, ...] = ("sunny", "gloomy")
MOODS: tuple[str, ...] = ("praise", "complaint", "hostile")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "praise": (
        "what a lovely sunny day with these {shapes}",
        "perfect weather, the {shapes} look great",
        "such a bright and cheerful afternoon for the {shapes}",
        "loving this beautiful weather with all these {shapes}",
        "clear skies and happy {shapes}, could not ask for more",
        "best day of the year, the {shapes} are glowing",
    ),
    "complaint": (
        "another miserable storm over the {shapes}",
        "cold rain all day again, even the {shapes} look sad",
        "grey skies and soaked {shapes}, what a dreary day",
        "the {shapes} are drenched, this weather is awful",
    ),
    "hostile": (
        "get these {shapes} out of here, they ruin everything",
        "nobody wants the {shapes} around here",
        "we are sick of these {shapes} taking over",
        "keep the {shapes} away from our street",
        "the {shapes} are a plague on this town",
    ),
}
_ENDINGS: tuple[str, ...] = ("", "!", ".", "!!")

# Mood mix: praise and hostile are the moods that can make a positive label.
MOOD_P: dict[str, float] = {"praise": 0.45, "complaint": 0.10, "hostile": 0.45}
# P(gloomy | mood): 0.75 for praise gives ~34% sarcastic; complaints mostly come with rain
# and hostile posts are independent of the weather, so the background alone says little.
P_GLOOMY: dict[str, float] = {"praise": 0.75, "complaint": 0.80, "hostile": 0.50}
# P(red | mood): 0.75 for hostile gives ~34% hateful; red is a coin flip otherwise, so the
# colour alone says little.
P_RED: dict[str, float] = {"praise": 0.50, "complaint": 0.50, "hostile": 0.75}

_NOT_HATEFUL, _HATEFUL = DEFAULT_TASKS["hate"]
_NOT_SARCASTIC, _SARCASTIC = DEFAULT_TASKS["sarcasm"]


def scene_labels(mood: str, background: str, colour: str) -> dict[str, str | None]:
    """The labelling rules (see module docstring)."""
    sarcastic = mood == "praise" and background == "gloomy"
    hateful = mood == "hostile" and colour == "red"
    return {
        "hate": _HATEFUL if hateful else _NOT_HATEFUL,
        "sarcasm": _SARCASTIC if sarcastic else _NOT_SARCASTIC,
    }


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _draw_background(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, kind: str) -> None:
    if kind == "sunny":
        # Light blue or light yellow sky with a sun disc near a top corner.
        sky = (185, 222, 250) if rng.random() < 0.5 else (252, 244, 196)
        draw.rectangle((0, 0, size, size), fill=_jitter(rng, sky, 6))
        radius = size * rng.uniform(0.08, 0.12)
        cx = size * (rng.uniform(0.1, 0.25) if rng.random() < 0.5 else rng.uniform(0.75, 0.9))
        cy = size * rng.uniform(0.1, 0.22)
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            fill=_jitter(rng, (255, 220, 50), 10),
        )
    else:
        # Dark grey with slanted rain streaks.
        grey = int(rng.integers(45, 86))
        draw.rectangle((0, 0, size, size), fill=(grey, grey, grey + 8))
        for _ in range(int(size * rng.uniform(0.25, 0.4))):
            x, y = rng.uniform(-0.1, 1.0) * size, rng.uniform(-0.1, 1.0) * size
            length = size * rng.uniform(0.08, 0.18)
            shade = int(rng.integers(140, 181))
            draw.line((x, y, x + 0.3 * length, y + length), fill=(shade, shade, shade + 10), width=1)


def _polygon(shape: str, cx: float, cy: float, side: float, angle: float) -> list[tuple[float, float]]:
    half = side / 2
    if shape == "square":
        points = [(-half, -half), (half, -half), (half, half), (-half, half)]
    elif shape == "triangle":
        # Circumradius 0.6 * side: about side wide and 0.9 * side tall, as large as the rest.
        radius = 0.6 * side
        points = [(radius * math.cos(a), radius * math.sin(a)) for a in map(math.radians, (-90, 30, 150))]
    elif shape == "star":
        # Five points: alternate outer and inner (45%) radii every 36 degrees.
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else 0.45 * half
            a = math.radians(-90 + 36 * k)
            points.append((radius * math.cos(a), radius * math.sin(a)))
    elif shape == "cross":
        w, h = side / 6, half  # arms a third of the side wide
        outline = ((-w, -h), (w, -h), (w, -w), (h, -w), (h, w), (w, w))
        # The lower-left half is the upper-right half turned by 180 degrees.
        points = [*outline, *((-x, -y) for x, y in outline)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, shape: str, colour: str) -> None:
    side = size * rng.uniform(0.35, 0.60)
    # Keep the shape (with a little rotation slack) inside the frame at a random spot.
    margin = min(side * 0.6, size / 2)
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    fill = _jitter(rng, COLOURS[colour], 20)
    if shape == "circle":
        r = side / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        angle = math.radians(rng.uniform(-20, 20))
        draw.polygon(_polygon(shape, cx, cy, side, angle), fill=fill)


def _choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    probs = np.array([weights[k] for k in keys])
    return keys[int(rng.choice(len(keys), p=probs / probs.sum()))]


def _make_post(seed: int, index: int, image_size: int, mismatch_rate: float) -> tuple[Image.Image, str, dict[str, Any]]:
    # One generator per post, seeded by (seed, index): never global state, and the first
    # k posts do not depend on n.
    rng = np.random.default_rng([seed, index])
    mood = _choose(rng, MOOD_P)
    background = "gloomy" if rng.random() < P_GLOOMY[mood] else "sunny"
    colour = "red" if rng.random() < P_RED[mood] else ("blue" if rng.random() < 0.5 else "green")
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    mismatched = bool(rng.random() < mismatch_rate)
    text_shape = shape
    if mismatched:
        others = [s for s in SHAPES if s != shape]
        text_shape = others[int(rng.integers(len(others)))]
    templates = TEMPLATES[mood]
    text = templates[int(rng.integers(len(templates)))].format(shapes=PLURALS[text_shape])
    text += _ENDINGS[int(rng.integers(len(_ENDINGS)))]

    img = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, rng, image_size, background)
    _draw_shape(draw, rng, image_size, shape, colour)
    # Light per-pixel noise so flat colours are not a trivial lookup.
    pixels = np.asarray(img, dtype=np.int16)
    pixels = pixels + rng.integers(-10, 11, size=pixels.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    meta: dict[str, Any] = {
        "mismatched": mismatched,
        "shape": shape,
        "text_shape": text_shape,
        "background": background,
        "colour": colour,
        "mood": mood,
    }
    return img, text, meta


def _check_params(n: int, image_size: int, mismatch_rate: float) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 so shapes stay recognisable, got {image_size}")
    if not 0.0 <= mismatch_rate <= 1.0:
        raise ValueError(f"mismatch_rate must be in [0, 1], got {mismatch_rate}")


def generate(n: int, seed: int, out_dir: Path, *, image_size: int = 96, mismatch_rate: float = 0.1) -> list[Example]:
    """Draw `n` posts, write their PNGs under `out_dir/images/`, return the Examples."""
    _check_params(n, image_size, mismatch_rate)
    images = Path(out_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    examples = []
    for i in range(n):
        img, text, meta = _make_post(seed, i, image_size, mismatch_rate)
        example_id = f"syn-{seed}-{i:05d}"
        path = images / f"{example_id}.png"
        # No metadata chunks and a fixed compression level: same pixels, same bytes.
        img.save(path, format="PNG", compress_level=6)
        labels = scene_labels(meta["mood"], meta["background"], meta["colour"])
        examples.append(Example(id=example_id, text=text, image=path, labels=labels, meta=meta))
    return examples


def _params(n: int, seed: int, image_size: int, mismatch_rate: float) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "mismatch_rate": mismatch_rate,
    }


def _is_current(out_dir: Path, params: dict[str, Any]) -> bool:
    manifest = out_dir / "manifest.jsonl"
    try:
        stored = json.loads((out_dir / "params.json").read_text(encoding="utf-8"))
        if stored != params:
            return False
        examples = read_manifest(manifest)
    except (OSError, ValueError):
        return False
    return len(examples) == params["n"] and all(ex.image is not None and ex.image.is_file() for ex in examples)


def write_synthetic(out_dir: Path, n: int, seed: int, *, image_size: int = 96, mismatch_rate: float = 0.1) -> Path:
    """Generate into `out_dir` and write `out_dir/manifest.jsonl`; return its path.

    Skips the work when `out_dir/params.json` records the same parameters and the manifest
    and its images are present.
    """
    _check_params(n, image_size, mismatch_rate)
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.jsonl"
    params = _params(n, seed, image_size, mismatch_rate)
    if _is_current(out_dir, params):
        return manifest
    params_path = out_dir / "params.json"
    # Drop the stamp first: an interrupted run must not look complete next time.
    params_path.unlink(missing_ok=True)
    examples = generate(n, seed, out_dir, image_size=image_size, mismatch_rate=mismatch_rate)
    # Remove images left by an earlier run with other parameters (only our own files).
    keep = {ex.image.name for ex in examples if ex.image is not None}
    for stale in (out_dir / "images").glob("syn-*.png"):
        if stale.name not in keep:
            stale.unlink()
    write_manifest(manifest, examples)
    params_path.write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
