"""A synthetic labelled dataset whose images really carry a 2-level hierarchy, for tests and the offline demo.

Superclass = background colour (with a faint per-superclass texture), class = the foreground shape; position,
size, colours jitter and pixel noise vary per image. A tiny CNN learns both levels on CPU in minutes, so
semantic retrieval (mAHP) is measurably better than chance and than flat-label training.
"""
from __future__ import annotations

import colorsys
import io

import numpy as np

from rayhash import storage
from rayhash.data.convert import CONVERTERS
from rayhash.data.shards import sample_members, write_dataset_json, write_split

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple")
HIERARCHY_FILE = "hierarchy.parent-child.txt"


def _background(s: int, n_super: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(s / n_super, 0.75, 0.85)
    return np.array([r, g, b]) * 255


def render(superclass: int, shape: int, n_super: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of ``SHAPES[shape]`` on superclass ``superclass``'s background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    bg = _background(superclass, n_super) + rng.normal(0, 12, 3)
    texture = 18 * np.sin(2 * np.pi * (superclass + 2) * (xx + yy) + rng.uniform(0, 2 * np.pi))
    img = bg[None, None, :] + texture[..., None]
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.17, 0.3)
    dx, dy = xx - cx, yy - cy
    name = SHAPES[shape]
    if name == "circle":
        mask = dx ** 2 + dy ** 2 < r ** 2
    elif name == "square":
        mask = (np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85)
    elif name == "triangle":
        mask = (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    elif name == "cross":
        mask = ((np.abs(dx) < r * 0.3) & (np.abs(dy) < r)) | ((np.abs(dy) < r * 0.3) & (np.abs(dx) < r))
    elif name == "ring":
        d2 = dx ** 2 + dy ** 2
        mask = (d2 < r ** 2) & (d2 > (0.55 * r) ** 2)
    else:  # stripes
        mask = (np.abs(dx) < r) & (np.abs(dy) < r) & (np.floor((dy + r) / (r / 2.5)) % 2 == 0)
    fg = np.full(3, rng.uniform(0, 50) if rng.random() < 0.5 else rng.uniform(205, 255)) + rng.normal(0, 10, 3)
    img[mask] = fg
    img += rng.normal(0, 8, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _make(record: dict) -> dict[str, bytes]:
    from PIL import Image

    p = record["gen"]
    rng = np.random.default_rng(p["seed"])
    img = render(p["superclass"], p["shape"], p["n_super"], p["size"], rng)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return {"png": buf.getvalue(), **sample_members(record)}


@CONVERTERS.register("synthetic", help="generated images under a 2-level hierarchy (offline; no SRC)", source=None,
                      limit=None, config="demo", demo_config="demo")
def convert_synthetic(out: str, superclasses: int = 4, classes_per_superclass: int = 4, image_size: int = 32,
                      per_class: dict[str, int] | None = None, shard_size: int = 256, seed: int = 0) -> dict:
    """Generate the dataset into ``out`` (splits ``train``/``test``; ``per_class`` images per class and split,
    default ``{"train": 30, "test": 10}``), with its hierarchy file ``out/hierarchy.parent-child.txt``
    (``root -> colour -> colour_shape``). Deterministic in ``seed``; returns the ``dataset.json`` document."""
    if not 1 <= superclasses <= len(COLOURS) or not 1 <= classes_per_superclass <= len(SHAPES):
        raise ValueError(f"superclasses must be in 1..{len(COLOURS)} and classes_per_superclass in "
                         f"1..{len(SHAPES)}, got {superclasses}, {classes_per_superclass}")
    per_class = per_class or {"train": 30, "test": 10}
    out = str(out)
    label_names = [f"{COLOURS[s]}_{SHAPES[c]}" for s in range(superclasses) for c in range(classes_per_superclass)]
    lines = [f"root {COLOURS[s]}" for s in range(superclasses)]
    lines += [f"{COLOURS[i // classes_per_superclass]} {n}" for i, n in enumerate(label_names)]
    storage.write_bytes(storage.join(out, HIERARCHY_FILE), ("\n".join(lines) + "\n").encode())
    result = {}
    for split_idx, (split, n) in enumerate(per_class.items()):
        records = []
        for _ in range(n):  # interleave classes so every shard holds all of them
            for label in range(len(label_names)):
                s, c = divmod(label, classes_per_superclass)
                i = len(records)
                records.append({"key": f"{split}-{i:06d}", "cls": label,
                                "json": {"label": label_names[label], "coarse_label": s,
                                         "coarse_label_name": COLOURS[s], "source": "synthetic"},
                                "gen": {"seed": [seed, split_idx, i], "superclass": s, "shape": c,
                                        "n_super": superclasses, "size": image_size}})
        result[split] = write_split(out, split, records, _make, shard_size)
    info = {"name": "synthetic", "kind": "labels", "label_names": label_names, "wnids": None,
            "hierarchy": HIERARCHY_FILE, "coarse_label_names": list(COLOURS[:superclasses]),
            "image_size": image_size, "seed": seed}
    return write_dataset_json(out, info, result)
