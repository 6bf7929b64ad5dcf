"""Shards as a Ray Train dataset: two workers get disjoint parts covering the dataset once per epoch."""
from __future__ import annotations

import json
import sys

import pytest
import ray.cloudpickle

from rayhash.data import load_dataset_info, read_shards


def _loop(config):
    import ray.train

    from rayhash.data import collate_torch

    ctx = ray.train.get_context()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(2):
        keys, labels = [], []
        for batch in shard.iter_torch_batches(batch_size=32, collate_fn=collate_torch):
            assert batch["image"].shape[1:] == (3, 32, 32)
            keys += batch["key"]
            labels += batch["label"].tolist()
        with open(f"{config['dir']}/rank{ctx.get_world_rank()}-epoch{epoch}.json", "w") as f:
            json.dump({"keys": keys, "labels": labels}, f)


@pytest.mark.slow
def test_two_train_workers_disjoint_cover_each_epoch(data_cifar_small, tmp_path, ray_local):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test module: not importable by workers
    info = load_dataset_info(data_cifar_small)
    expected = {r["key"]: r["label"] for r in read_shards(str(data_cifar_small / "test"), mode="raw").take_all()}
    ds = read_shards(str(data_cifar_small / "test"), mode="train", shuffle=True, seed=1)
    out = tmp_path / "keys"
    out.mkdir()
    trainer = TorchTrainer(_loop, train_loop_config={"dir": str(out)},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="data"),
                           datasets={"train": ds})
    trainer.fit()
    for epoch in range(2):
        parts = [json.loads((out / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2)]
        k0, k1 = set(parts[0]["keys"]), set(parts[1]["keys"])
        assert len(parts[0]["keys"]) == len(k0) and len(parts[1]["keys"]) == len(k1)  # no repeats
        assert k0 and k1 and not (k0 & k1)  # both workers got data, disjoint
        assert k0 | k1 == set(expected) and len(expected) == info.count("test")  # together: everything once
        for p in parts:
            assert all(expected[k] == y for k, y in zip(p["keys"], p["labels"]))
