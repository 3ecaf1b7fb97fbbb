"""Scenes: the ground truth behind every image of the demo web.

A scene is a background colour and 1–4 objects (shape, colour, size class, normalised centre,
scale, angle). The first object is the *dominant* one: it is strictly larger than the others and
is drawn on top, so "the concept of the image" (its colour + shape) is unambiguous.

Concepts (colour, shape) follow a Zipf law over a fixed ranking, so a few concepts dominate the
web and a long tail is rare, as on the real web; that is what MetaCLIP-style balancing is for.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import random
from typing import Any

Scene = dict[str, Any]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "heart", "cross", "diamond",
                           "crescent", "pentagon", "ring", "arrow", "octagon", "oval")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "blue": (35, 75, 215), "green": (30, 160, 60), "yellow": (245, 215, 30),
    "orange": (250, 135, 20), "purple": (130, 45, 170), "pink": (245, 140, 190), "brown": (125, 75, 35),
    "black": (15, 15, 15), "white": (250, 250, 250), "gray": (128, 128, 128), "turquoise": (40, 205, 195),
    "beige": (225, 200, 160),
}

# Plain backgrounds, white most often (product shots, clip art).
BACKGROUNDS: dict[str, float] = {"white": 0.5, "black": 0.1, "gray": 0.12, "beige": 0.1, "yellow": 0.06,
                                 "blue": 0.06, "green": 0.06}

SIZES: tuple[str, ...] = ("small", "medium", "large")
# Object radius as a fraction of min(width, height), per size class.
SIZE_SCALE: dict[str, tuple[float, float]] = {"small": (0.08, 0.12), "medium": (0.15, 0.19), "large": (0.24, 0.30)}

# Shapes that turn into another shape (square -> diamond) or look wrong when rotated far.
_UPRIGHT = frozenset({"square", "diamond", "cross", "heart"})

N_OBJECTS_WEIGHTS = (0.35, 0.3, 0.2, 0.15)  # 1, 2, 3, 4 objects

# Exponent of the concept Zipf law: with 182 concepts, 1.15 puts ~41 % of the web on the top 3.
ZIPF_EXPONENT = 1.15
# The head is chosen by hand so it spans several shapes and colours; the rest of the ranking is a
# fixed hash order, independent of the seed, so "red circle is the head" holds for every world.
_HEAD = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"), ("black", "heart"),
         ("orange", "circle"), ("white", "cross"), ("purple", "hexagon")]


def _ranked_concepts() -> list[tuple[str, str]]:
    rest = [c for c in itertools.product(COLOURS, SHAPES) if c not in _HEAD]
    rest.sort(key=lambda c: hashlib.sha256(f"{c[0]} {c[1]}".encode()).hexdigest())
    return _HEAD + rest


CONCEPTS: list[tuple[str, str]] = _ranked_concepts()
CONCEPT_WEIGHTS: list[float] = [1.0 / (r + 1) ** ZIPF_EXPONENT for r in range(len(CONCEPTS))]
_CUM_CONCEPT = list(itertools.accumulate(CONCEPT_WEIGHTS))


def concept_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def pick_concept(rng: random.Random) -> tuple[str, str]:
    return CONCEPTS[bisect.bisect_right(_CUM_CONCEPT, rng.random() * _CUM_CONCEPT[-1])]


def _weighted(rng: random.Random, options: dict[str, float], exclude: set[str] = frozenset()) -> str:
    names = [n for n in options if n not in exclude]
    return rng.choices(names, weights=[options[n] for n in names])[0]


def image_size(rng: random.Random, min_size: int, max_size: int) -> tuple[int, int]:
    """Random aspect: width and height drawn independently."""
    return rng.randint(min_size, max_size), rng.randint(min_size, max_size)


def sample_scene(rng: random.Random, width: int, height: int, *, dominant: tuple[str, str] | None = None,
                 n_objects: int | None = None, secondary_sizes: tuple[str, ...] | None = None) -> Scene:
    """One scene laid out for a width x height canvas (positions are stored normalised, so the
    same scene renders at any size: that is how near-duplicates are made)."""
    colour, shape = dominant if dominant is not None else pick_concept(rng)
    n = n_objects if n_objects is not None else rng.choices((1, 2, 3, 4), weights=N_OBJECTS_WEIGHTS)[0]
    dom_size = rng.choices(("medium", "large"), weights=(0.35, 0.65))[0]
    smaller = secondary_sizes or SIZES[:SIZES.index(dom_size)]
    objects: list[dict[str, Any]] = [{"shape": shape, "colour": colour, "size": dom_size}]
    for _ in range(n - 1):
        if rng.random() < 0.4:
            # Repeat the previous object's look: captions then say "two small blue squares".
            prev = objects[-1]
            c, s = prev["colour"], prev["shape"]
        else:
            c, s = pick_concept(rng)
        objects.append({"shape": s, "colour": c, "size": rng.choice(smaller)})
    background = _weighted(rng, BACKGROUNDS, exclude={o["colour"] for o in objects})
    _place(rng, objects, width, height)
    return {"background": background, "objects": objects}


def _place(rng: random.Random, objects: list[dict[str, Any]], width: int, height: int) -> None:
    """Centres inside the canvas, avoiding overlaps where a few tries allow it."""
    m = min(width, height)
    placed: list[tuple[float, float, float]] = []
    for obj in objects:
        lo, hi = SIZE_SCALE[obj["size"]]
        scale = rng.uniform(lo, hi)
        r = scale * m
        best = None
        for _ in range(25):
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            gap = min((math.hypot(cx - px, cy - py) - (r + pr) for px, py, pr in placed), default=1.0)
            if best is None or gap > best[0]:
                best = (gap, cx, cy)
            if gap > 0:
                break
        _, cx, cy = best
        placed.append((cx, cy, r))
        obj.update(x=round(cx / width, 4), y=round(cy / height, 4), scale=round(scale, 4),
                   angle=rng.randint(-15, 15) if obj["shape"] in _UPRIGHT else rng.randint(0, 359))


def dominant(scene: Scene) -> dict[str, Any]:
    return scene["objects"][0]


def concept_of(scene: Scene) -> str:
    d = dominant(scene)
    return concept_name(d["colour"], d["shape"])


def groups(scene: Scene) -> list[tuple[int, str, str, str]]:
    """(count, size, colour, shape) groups of identical-looking objects, dominant first, then by size."""
    counts: dict[tuple[str, str, str], int] = {}
    for o in scene["objects"]:
        key = (o["size"], o["colour"], o["shape"])
        counts[key] = counts.get(key, 0) + 1
    keys = list(counts)  # insertion order: the dominant object's group first
    rest = sorted(keys[1:], key=lambda k: -SIZES.index(k[0]))
    return [(counts[k], *k) for k in [keys[0], *rest]]


def scene_json(scene: Scene) -> str:
    return json.dumps(scene, sort_keys=True, separators=(",", ":"))


def metadata_titles() -> list[str]:
    """The world's visual vocabulary as MetaCLIP title entries (it stands in for WordNet +
    Wikipedia titles in the demo): shapes and their plurals, colours, every colour-shape pair."""
    return [*SHAPES, *(f"{s}s" for s in SHAPES), *COLOURS, *(f"{c} {s}" for c in COLOURS for s in SHAPES)]
