"""Data stage: converters to WebDataset shards, ``dataset.json``, and streaming through Ray Data.

Shard contract: ``DS/<split>/<split>-%06d.tar``, samples ``<key>.{png|jpg|webp}``, ``<key>.cls``
(int label, when labelled), ``<key>.json`` (label name, wnid, coarse label, captions, source id), and
``DS/dataset.json`` (name, kind, label names, wnids, hierarchy, per-split shard list with counts and sha256).
"""
from __future__ import annotations

from rayhash.data.captions import convert_captions, embed_captions
from rayhash.data.cifar import convert_cifar100
from rayhash.data.convert import CONVERTERS, convert
from rayhash.data.imagefolder import convert_imagefolder
from rayhash.data.images import IMAGE_MEAN, IMAGE_STD, decode_image, eval_transform, train_transform
from rayhash.data.info import DatasetInfo, load_dataset_info
from rayhash.data.stream import read_shards, shard_urls, skip_counts
from rayhash.data.synthetic import convert_synthetic

__all__ = [
    "CONVERTERS", "convert", "convert_cifar100", "convert_imagefolder", "convert_captions", "convert_synthetic",
    "embed_captions",
    "DatasetInfo", "load_dataset_info", "read_shards", "collate_torch", "shard_urls", "skip_counts",
    "decode_image", "eval_transform", "train_transform", "IMAGE_MEAN", "IMAGE_STD",
]


def __getattr__(name: str):
    """``collate_torch`` (a Ray ``NumpyBatchCollateFn``) is created on first access: importing Ray is deferred."""
    if name == "collate_torch":
        from rayhash.data import stream

        return stream.collate_torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
