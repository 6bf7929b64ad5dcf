"""Fixtures of the index stage: random low-entropy codes (many Hamming ties) written as code shards, and indices
built over them with 1, 3 and 7 shards."""
from __future__ import annotations

import numpy as np
import pytest

INDEX_N, INDEX_BITS = 1500, 16


def brute_distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """All Hamming distances (nq, n) between packed codes, int64, by numpy alone (no FAISS)."""
    return np.unpackbits(q[:, None, :] ^ db[None, :, :], axis=2).sum(axis=2, dtype=np.int64)


def index_random_table(n: int = INDEX_N, bits: int = INDEX_BITS, seed: int = 0):
    """Keys (shuffled, unique), codes with P(bit=1)=0.15 (so distances tie a lot), labels in 0..9."""
    rng = np.random.default_rng(seed)
    codes = np.packbits((rng.random((n, bits)) < 0.15).astype(np.uint8), axis=1)
    keys = np.array([f"img-{i:06d}" for i in rng.permutation(10 * n)[:n]], dtype=object)
    labels = rng.integers(0, 10, n).astype(np.int32)
    return keys, codes, labels


def index_write_code_dir(path, keys, codes, labels, files: int = 3) -> str:
    from rayhash.index import write_codes

    bounds = np.linspace(0, len(keys), files + 1).astype(int)
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_codes(str(path / f"codes-{j:05d}.parquet"), keys[a:b], codes[a:b], labels[a:b])
    return str(path)


@pytest.fixture(scope="session")
def index_random_codes(tmp_path_factory):
    """(codes dir, keys, codes, labels) of random 16-bit codes in 3 Parquet shards."""
    keys, codes, labels = index_random_table()
    path = tmp_path_factory.mktemp("index_codes")
    return index_write_code_dir(path, keys, codes, labels), keys, codes, labels


@pytest.fixture(scope="session")
def index_flat_indices(tmp_path_factory, index_random_codes, ray_local):
    """{shards: index dir} of flat indices over ``index_random_codes`` with 1, 3 and 7 shards."""
    from rayhash.index import build_index

    root = tmp_path_factory.mktemp("index_flat")
    out = {}
    for s in (1, 3, 7):
        out[s] = str(root / f"flat{s}")
        build_index(index_random_codes[0], out[s], index_type="flat", shards=s)
    return out


def index_save_tiny_checkpoint(run_dir, ds_dir, bits: int = 16, seed: int = 0) -> str:
    """A tiny untrained (seeded) HashNet saved in the training stage's checkpoint format: RUN/final/."""
    import torch
    from fixtures_train import TRAIN_TINY

    from rayhash.config import load_config
    from rayhash.data import load_dataset_info
    from rayhash.model import HashNet
    from rayhash.model.checkpoint import save_model_files

    info = load_dataset_info(ds_dir)
    cfg = load_config(TRAIN_TINY, [f"data.path={ds_dir}", f"model.bits={bits}"])
    torch.manual_seed(seed)
    model = HashNet.from_config(cfg.model, info.num_classes)
    save_model_files(str(run_dir / "final"), model, cfg,
                     {"num_classes": info.num_classes, "label_names": info.label_names})
    return str(run_dir)


@pytest.fixture(scope="session")
def index_tiny_checkpoint(tmp_path_factory, data_cifar_small):
    """RUN folder of a tiny 32-bit HashNet (16-px input) for the CIFAR-100 test fixture."""
    return index_save_tiny_checkpoint(tmp_path_factory.mktemp("index_run"), data_cifar_small, bits=32)
