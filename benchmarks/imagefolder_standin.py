"""An ImageNet-layout stand-in built from CIFAR-100: ``OUT/train/<wnid>/*.JPEG`` and ``OUT/val/<wnid>/*.JPEG``, each
CIFAR class filed under the WordNet noun synset it names (apple -> n07739125 apple.n.01, aquarium_fish ->
goldfish.n.01, ...), images upscaled to ``--size`` pixels.

What it is for: checking that a config learns on a real-photo, WordNet-labelled, ImageNet-layout dataset (as
``rayhash data convert imagefolder`` reads one) when no such dataset is at hand. Because every class sits on its
own synset, visual similarity follows the WordNet hierarchy the way it does on ImageNet (the mammals are near one
another in both), which a stand-in with arbitrary wnids would not give.

    python benchmarks/imagefolder_standin.py --cifar cifar-100-python.tar.gz --out /tmp/standin --per-class 100
    rayhash demo --dataset imagefolder --data /tmp/standin --config configs/demo.yaml --out runs/standin

Needs WordNet for nltk (``NLTK_DATA``). Train images: the first ``--per-class`` of each class in the CIFAR train
split; val: the whole test split.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# CIFAR class name -> WordNet synset where the first noun sense is not the pictured thing; the rest take their
# first noun.animal sense, else their first noun sense.
SYNSETS = {
    "aquarium_fish": "goldfish.n.01", "maple_tree": "maple.n.02", "oak_tree": "oak.n.02", "palm_tree": "palm.n.03",
    "pine_tree": "pine.n.01", "willow_tree": "willow.n.01", "ray": "ray.n.07", "plate": "plate.n.04",
    "cloud": "cloud.n.02", "forest": "forest.n.02", "castle": "castle.n.02", "table": "table.n.02",
    "sweet_pepper": "sweet_pepper.n.02", "pickup_truck": "pickup.n.01", "television": "television_receiver.n.01",
    "boy": "male_child.n.01", "girl": "female_child.n.01", "bowl": "bowl.n.03", "lamp": "lamp.n.02",
    "couch": "sofa.n.01", "baby": "baby.n.01", "man": "man.n.01",
}


def wnids_for(names: list[str]) -> list[str]:
    from nltk.corpus import wordnet as wn

    out = []
    for name in names:
        if name in SYNSETS:
            synset = wn.synset(SYNSETS[name])
        else:
            senses = wn.synsets(name, "n")
            animals = [s for s in senses if s.lexname() == "noun.animal"]
            synset = (animals or senses)[0]
        out.append(f"n{synset.offset():08d}")
    if len(set(out)) != len(out):
        raise SystemExit(f"two classes on one synset: {sorted(w for w in out if out.count(w) > 1)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", required=True, help="the official cifar-100-python archive (.tar.gz) or folder")
    p.add_argument("--out", required=True, help="folder to write the ImageNet-layout tree into")
    p.add_argument("--per-class", type=int, default=100, help="train images per class")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (CIFAR is 32)")
    args = p.parse_args(argv)

    from PIL import Image

    from rayhash.data.cifar import _read_pickles

    data = _read_pickles(args.cifar, ["train", "test"])
    wnids = wnids_for(list(data["meta"]["fine_label_names"]))
    for split, folder, per_class in (("train", "train", args.per_class), ("test", "val", None)):
        d = data[split]
        images = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        seen = np.zeros(len(wnids), int)
        for i, label in enumerate(d["fine_labels"]):
            if per_class is not None and seen[label] >= per_class:
                continue
            seen[label] += 1
            target = os.path.join(args.out, folder, wnids[label])
            os.makedirs(target, exist_ok=True)
            Image.fromarray(images[i]).resize((args.size, args.size), Image.BICUBIC).save(
                os.path.join(target, f"{wnids[label]}_{i}.JPEG"), quality=90)
        print(f"{folder}: {int(seen.sum())} images in {len(wnids)} class folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
