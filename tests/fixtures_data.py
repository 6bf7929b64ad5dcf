"""Session fixtures of the data stage: small real datasets converted once per test session.

- ``data_cifar_small``: CIFAR-100 from ../shared/data (10 train / 3 test images per class: 1000 / 300 samples,
  shards of 250), returns the dataset folder (``DS/train``, ``DS/test``, ``DS/dataset.json``).
- ``data_synthetic_small``: the synthetic 4x4 hierarchy dataset (16 classes, 32 px, 30 train / 10 test per
  class: 480 / 160 samples, shards of 128), returns the dataset folder.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_cifar_small(tmp_path_factory, ray_local):
    from conftest import shared

    from rayhash.data import convert_cifar100

    src = shared("cifar-100-python.tar.gz")
    out = tmp_path_factory.mktemp("data_cifar_small") / "ds"
    convert_cifar100(str(src), str(out), shard_size=250, limit_per_class={"train": 10, "test": 3})
    return out


@pytest.fixture(scope="session")
def data_synthetic_small(tmp_path_factory, ray_local):
    from rayhash.data import convert_synthetic

    out = tmp_path_factory.mktemp("data_synthetic_small") / "ds"
    convert_synthetic(str(out), superclasses=4, classes_per_superclass=4, image_size=32,
                      per_class={"train": 30, "test": 10}, shard_size=128)
    return out
