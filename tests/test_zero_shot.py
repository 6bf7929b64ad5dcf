"""Zero-shot protocol: dataset.json records label counts, training sees only `data.train_classes`, and eval can
restrict queries to the unseen classes."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rayhash import testing


def _tar_labels(ds: Path, split: str) -> Counter:
    counts = Counter()
    for tar_path in sorted((ds / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            counts.update(int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls"))
    return counts


def test_dataset_json_label_counts_match_the_tars(data_synthetic_small):
    info = json.loads((data_synthetic_small / "dataset.json").read_text())
    for split in ("train", "test"):
        recorded = Counter({int(k): v for k, v in info["splits"][split]["label_counts"].items()})
        assert recorded == _tar_labels(data_synthetic_small, split)


@pytest.mark.slow
def test_training_on_seen_classes_only_then_eval_on_unseen(ray_local, data_synthetic_small, train_tiny_config,
                                                           tmp_path):
    from rayhash.data import load_dataset_info
    from rayhash.encode import encode_dataset
    from rayhash.eval import evaluate
    from rayhash.index import build_index
    from rayhash.train import train

    seen, unseen = list(range(12)), list(range(12, 16))
    trace = tmp_path / "trace"
    cfg = train_tiny_config(data_synthetic_small, f"data.train_classes={seen}", "train.epochs=1",
                            "train.num_workers=1", "train.batch_size=40")
    result = train(cfg, str(tmp_path / "run"), hooks=testing.hooks(trace=trace))
    labels = [x for f in sorted(trace.glob("epoch0-rank*")) for x in json.loads(f.read_text())["labels"]]
    n_seen = load_dataset_info(data_synthetic_small).count("train", seen)
    assert n_seen == sum(_tar_labels(data_synthetic_small, "train")[c] for c in seen)
    assert set(labels) <= set(seen) and len(labels) == n_seen // 40 * 40
    assert result.metrics[-1]["step"] == n_seen // 40

    encode_dataset(result.checkpoint, str(data_synthetic_small / "train"), str(tmp_path / "codes"))
    build_index(str(tmp_path / "codes"), str(tmp_path / "index"))
    m = evaluate(str(tmp_path / "index"), None, str(data_synthetic_small / "test"), str(tmp_path / "eval"),
                 classes=unseen)
    per_query = _read_parquet(tmp_path / "eval" / "per_query.parquet")
    assert set(np.unique(per_query["label"])) == set(unseen)
    assert m["n_queries"] == sum(_tar_labels(data_synthetic_small, "test")[c] for c in unseen)


def _read_parquet(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()
