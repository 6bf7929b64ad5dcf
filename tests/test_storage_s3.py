"""Object storage for real: every stage's input and output on s3:// against moto's S3 server (see fixtures_storage),
reached through AWS_ENDPOINT_URL as a MinIO / Ceph user reaches theirs."""
from __future__ import annotations

import os

import pytest

from rayhash import storage


def test_endpoint_reaches_pyarrow_and_ray_workers(s3, ray_local):
    uri = s3.prefix("endpoint") + "/hello.txt"
    storage.write_bytes(uri, b"hello")
    assert list(s3.keys(uri).values())[0][0] == 5  # pyarrow wrote to the moto server, not to real AWS

    @ray_local.remote
    def remote_read(u: str) -> tuple[str | None, bytes]:
        from rayhash import storage

        return os.environ.get("AWS_ENDPOINT_URL"), storage.read_bytes(u)

    endpoint, data = ray_local.get(remote_read.remote(uri), timeout=300)
    assert endpoint == s3.url and data == b"hello"


PIPELINE_OVERRIDES = ["train.epochs=2"]


@pytest.fixture(scope="module")
def s3_pipeline(s3, ray_local):
    """The whole pipeline with every stage's input and output on s3://, Ray Train checkpoints included; then the
    same command again. Returns (out URI, checkpoint storage URI, metrics, re-run metrics, objects before and after
    the re-run)."""
    from rayhash.pipeline import run_pipeline

    out, ckpts = s3.prefix("pipeline"), s3.prefix("ray-storage")
    overrides = [*PIPELINE_OVERRIDES, f"train.storage_path={ckpts}"]
    metrics = run_pipeline(out, dataset="synthetic", config="demo", overrides=overrides)
    before = {**s3.keys(out), **s3.keys(ckpts)}
    again = run_pipeline(out, dataset="synthetic", config="demo", overrides=overrides)
    after = {**s3.keys(out), **s3.keys(ckpts)}
    return out, ckpts, metrics, again, before, after


@pytest.mark.slow
def test_pipeline_runs_on_s3(s3, s3_pipeline):
    out, ckpts, metrics, _, before, _ = s3_pipeline
    on_s3 = storage.read_json(f"{out}/eval/metrics.json")
    assert on_s3["mAHP@250"] == pytest.approx(metrics["mAHP@250"])
    assert on_s3["n_database"] == 480 and on_s3["n_queries"] == 160
    for png in ("hp_curve.png", "bit_balance.png", "distance_histograms.png", "precision_recall.png"):
        assert before[f"{out}/eval/{png}".removeprefix(f"s3://{s3.bucket}/")][0] > 1000
    assert storage.read_json(f"{out}/eval/reference/metrics.json")["protocol"] == "reference"
    codes = storage.read_json(f"{out}/codes/codes.json")
    assert codes["count"] == 480 and codes["skipped_corrupt"] == 0
    # Ray Train wrote its checkpoints to the object store, and the run's final model was exported there
    ckpt_prefix = ckpts.removeprefix(f"s3://{s3.bucket}/")
    assert any(k.startswith(f"{ckpt_prefix}/train/") and k.endswith("/model.pt") for k in before)
    assert storage.exists(f"{out}/run/final/model.pt") and storage.exists(f"{out}/run/curves.png")
    # nothing half-written or staged is left behind
    assert not [k for k in before if ".tmp" in k.rsplit("/", 1)[-1]]


def test_pipeline_rerun_on_s3_resumes_and_redoes_nothing(s3, s3_pipeline):
    out, _, metrics, again, before, after = s3_pipeline
    assert again["mAHP@250"] == metrics["mAHP@250"] and again["n_database"] == 480
    assert set(after) == set(before)  # no new objects: no second training run, no new code or index files
    prefix = out.removeprefix(f"s3://{s3.bucket}/")
    kept = [k for k in before if not k.startswith(f"{prefix}/eval/")]  # evaluation is what a re-run reports again
    assert {"data", "run", "codes", "index"} <= {k.removeprefix(f"{prefix}/").split("/")[0] for k in kept}
    changed = [k for k in kept if after[k] != before[k]]
    assert not changed, changed  # shards, checkpoints, model, codes and index objects were not written again


def test_query_index_on_s3_leaves_no_local_copies(s3_pipeline, tmp_path, monkeypatch):
    import tempfile

    from rayhash.index import ShardedIndex, read_codes

    spool = tmp_path / "tmp"  # every temporary file or folder this process makes lands here
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    out = s3_pipeline[0]
    table = read_codes(f"{out}/codes")
    with ShardedIndex.open(f"{out}/index") as index:
        assert index.ntotal == len(table) == 480 and index.num_shards == 2
        res = index.search(table.codes[:5], k=3)
    assert (res.distances[:, 0] == 0).all()  # every database code finds itself (or an identical code) first
    assert list(spool.iterdir()) == []  # the shards were read into memory, not copied to local disk


def test_eval_cli_writes_to_s3(s3, s3_pipeline):
    from rayhash.cli import main

    out = s3_pipeline[0]
    dest = s3.prefix("eval-cli")
    assert main(["eval", "--index", f"{out}/index", "--queries", f"{out}/data/test", "--out", dest,
                 "--max-queries", "50"]) == 0
    written = s3.keys(dest)
    prefix = dest.removeprefix(f"s3://{s3.bucket}/")
    assert storage.read_json(f"{dest}/metrics.json")["n_queries"] == 50
    for png in ("hp_curve.png", "bit_balance.png"):
        assert written[f"{prefix}/{png}"][0] > 1000


# ------------------------------------------------------------------------------------------ nothing partial
def _write(writer: str, uri: str, data: bytes, fail: bool) -> None:
    if writer == "open_output":  # a stream straight to the store
        with storage.open_output(uri) as f:
            f.write(data)
            if fail:
                raise RuntimeError("writer failed midway")
    else:  # a local file, uploaded when the body is done
        with storage.atomic_output(uri) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
            if fail:
                raise RuntimeError("writer failed midway")


@pytest.mark.parametrize("writer", ["open_output", "atomic_output"])
def test_failed_upload_leaves_nothing_under_its_name(s3, writer):
    folder = s3.prefix(f"partial-{writer}")
    uri = f"{folder}/big.bin"
    key = uri.removeprefix(f"s3://{s3.bucket}/")
    body = os.urandom(12 << 20)  # several multipart parts are on the server when the writer fails
    with pytest.raises(RuntimeError, match="midway"):
        _write(writer, uri, body, fail=True)
    assert s3.keys(folder) == {}  # neither the object nor a staging object
    _write(writer, uri, b"old", fail=False)
    with pytest.raises(RuntimeError, match="midway"):
        _write(writer, uri, body, fail=True)
    assert list(s3.keys(folder)) == [key] and storage.read_bytes(uri) == b"old"  # the complete version survives
    _write(writer, uri, body, fail=False)
    assert list(s3.keys(folder)) == [key] and storage.read_bytes(uri) == body


def test_zero_length_outputs_are_redone_on_resume(s3, s3_pipeline):
    """A zero-length shard or code file (an object some tool left empty) is never taken for done."""
    from rayhash.data import convert_synthetic, load_dataset_info
    from rayhash.encode import encode_dataset

    ds = s3.prefix("zero-ds")
    convert_synthetic(ds, per_class={"train": 2, "test": 1}, shard_size=16)
    shard = load_dataset_info(ds).shard_paths("train")[0]
    good = storage.read_bytes(shard)
    s3.client().put_object(Bucket=s3.bucket, Key=shard.removeprefix(f"s3://{s3.bucket}/"), Body=b"")
    convert_synthetic(ds, per_class={"train": 2, "test": 1}, shard_size=16)
    assert storage.read_bytes(shard) == good

    out, checkpoint = s3.prefix("zero-codes"), f"{s3_pipeline[0]}/run/final"
    first = encode_dataset(checkpoint, f"{ds}/train", out)
    s3.client().put_object(Bucket=s3.bucket, Key=f"{out}/codes-00000.parquet".removeprefix(f"s3://{s3.bucket}/"),
                           Body=b"")
    again = encode_dataset(checkpoint, f"{ds}/train", out)
    assert first["count"] == again["count"] == 32 and again["timing"]["encoded"] == 16  # the emptied shard's codes
    assert storage.finished(f"{out}/codes-00000.parquet")


def test_embed_captions_on_s3_publishes_complete_output_only(s3, ray_local):
    from conftest import shared

    from rayhash.data import convert_captions, embed_captions
    from rayhash.data.captions import DONE
    from rayhash.data.stream import load_caption_embeddings

    ds = s3.prefix("captions")
    convert_captions(str(shared("flickr8k-1k")), ds, limit=8, shard_size=4, val_fraction=0.25)
    out = embed_captions(ds)
    assert out == f"{ds}/caption_embeddings.parquet" and storage.exists(f"{out}/{DONE}")
    keys, emb = load_caption_embeddings(out)
    assert len(keys) == 8 and emb.shape == (8, 384)
    written = s3.keys(out)
    assert embed_captions(ds) == out and s3.keys(out) == written  # complete: kept as it is

    # an interrupted write (Parquet files, no _SUCCESS) is not taken for done: written again from scratch
    s3.client().delete_object(Bucket=s3.bucket, Key=f"{out}/{DONE}".removeprefix(f"s3://{s3.bucket}/"))
    s3.client().put_object(Bucket=s3.bucket, Key=f"{out}/stale-part.parquet".removeprefix(f"s3://{s3.bucket}/"),
                           Body=b"partial")
    embed_captions(ds)
    rewritten = s3.keys(out)
    assert f"{out}/{DONE}".removeprefix(f"s3://{s3.bucket}/") in rewritten
    assert not [k for k in rewritten if k.endswith("stale-part.parquet")]
    assert len(load_caption_embeddings(out)[0]) == 8
