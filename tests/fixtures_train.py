"""Fixtures of the training stage: a tiny, fast run config (tiny CNN on 16-px images, CPU)."""
from __future__ import annotations

import pytest

TRAIN_TINY = {
    "data": {"image_size": 16, "shuffle_buffer": 64},
    "model": {"backbone": "tiny_cnn", "bits": 16, "width": 8},
    "loss": {"alpha": 1.0, "beta": 1.0},
    "train": {"num_workers": 2, "epochs": 2, "batch_size": 40, "lr": 3e-3, "warmup_epochs": 0.5,
              "use_gpu": False, "max_failures": 0},
    "validation": {"subset": 100, "k": 50},
}


@pytest.fixture
def train_tiny_config():
    """A function (data_path, *overrides) -> validated RunConfig of the tiny test setup."""
    from rayhash.config import load_config

    def make(data_path, *overrides: str):
        return load_config(TRAIN_TINY, [f"data.path={data_path}", *overrides])

    return make
