"""Encoding stage: Ray Data batch inference of a checkpoint over WebDataset shards into Parquet code shards
(``codes-%05d.parquet``: key, code fixed_size_binary(bits/8), label int32) + ``codes.json``."""
from __future__ import annotations

from rayhash.encode.batch import EncodeBatch, encode_dataset

__all__ = ["EncodeBatch", "encode_dataset"]
