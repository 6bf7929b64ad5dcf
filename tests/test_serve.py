"""`rayhash serve`: a real Ray Serve application on the session's local Ray, over a small index of the synthetic
dataset (a seeded tiny checkpoint, so 16-bit codes with many Hamming ties), queried over loopback HTTP with
`requests` and from a real headless Chromium; every answer is checked against `ShardedIndex.search`."""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests

from rayhash.serve import api

TIMEOUT = 120  # seconds per HTTP request: generous, the machine may be loaded
TOKEN = "serve-test-token-5e1f0c"
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_index(tmp_path_factory, data_synthetic_small, ray_local):
    """(index dir, dataset train split) of a 3-shard flat index whose manifest records a tiny checkpoint."""
    from fixtures_index import index_save_tiny_checkpoint

    from rayhash.encode import encode_dataset
    from rayhash.index import build_index

    root = tmp_path_factory.mktemp("serve")
    run = index_save_tiny_checkpoint(root / "run", data_synthetic_small, bits=16)
    split = str(data_synthetic_small / "train")
    encode_dataset(run, split, str(root / "codes"), batch_size=128)
    build_index(str(root / "codes"), str(root / "index"), index_type="flat", shards=3)
    return str(root / "index"), split


@pytest.fixture(scope="module")
def service(serve_index):
    """The service over ``serve_index`` with --data, on a free loopback port; Serve shut down afterwards."""
    from ray import serve

    from rayhash.serve import start_service

    svc = start_service(serve_index[0], port=_free_port(), data=serve_index[1])
    yield svc
    svc.stop()
    serve.shutdown()


@pytest.fixture(scope="module")
def auth_service(service, index_flat_indices):
    """A second application on the same Serve (at /auth), with a token, over an index with no checkpoint."""
    from rayhash.serve import start_service

    port = int(service.url.rsplit(":", 1)[1].strip("/"))
    svc = start_service(index_flat_indices[1], port=port, token=TOKEN, name="rayhash-auth", route_prefix="/auth")
    yield svc
    svc.stop()


def _dataset_images(split: str, n: int) -> list[tuple[str, bytes]]:
    """(key, PNG bytes) of the first ``n`` images of the split's first tar."""
    tar = sorted(Path(split).glob("*.tar"))[0]
    out = []
    with tarfile.open(tar) as tf:
        for m in tf:
            if m.name.endswith(".png"):
                out.append((m.name.split(".", 1)[0], tf.extractfile(m).read()))
            if len(out) == n:
                break
    return out


def _post(url: str, **kw) -> requests.Response:
    return requests.post(url, timeout=TIMEOUT, **kw)


def _png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (no pixel data: refused before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_search_and_range_equal_sharded_index(service):
    from rayhash.index import ShardedIndex

    index = service.index
    queries = np.random.default_rng(1).integers(0, 256, (6, index.bits // 8), dtype=np.uint8)
    hexes = [q.tobytes().hex() for q in queries]
    with ShardedIndex.open(index.path, mode="local") as local:
        for k in (1, 7, 60, api.MAX_K):  # 60: past many ties; MAX_K: past the 480 codes (null-padded)
            got = _post(service.url + "search", json={"codes": hexes, "k": k})
            assert got.status_code == 200, got.text
            want = index.search(queries, k)
            assert got.json() == {"keys": want.keys.tolist(), "distances": want.distances.tolist(),
                                  "labels": want.labels.tolist()}
            assert local.search(queries, k).keys.tolist() == want.keys.tolist()  # ties by key, whatever the sharding
            assert "search;dur=" in got.headers["Server-Timing"]
        for radius in (0, 3):
            got = _post(service.url + "range", json={"codes": hexes, "radius": radius})
            assert got.status_code == 200, got.text
            want = index.range_search(queries, radius)
            rows = [slice(a, b) for a, b in zip(want.lims[:-1], want.lims[1:])]
            assert got.json() == {name: [getattr(want, name)[r].tolist() for r in rows]
                                  for name in ("keys", "distances", "labels")}


def test_image_search_items_and_info(service, serve_index, tmp_path):
    index = service.index
    images = _dataset_images(serve_index[1], 3)
    paths = []
    for key, png in images:
        paths.append(tmp_path / f"{key}.png")
        paths[-1].write_bytes(png)
        got = _post(service.url + "search/image", params={"k": 12}, files={"image": (f"{key}.png", png, "image/png")})
        assert got.status_code == 200, got.text
        want = index.search_images([str(paths[-1])], 12)  # the driver's encoder, same checkpoint
        assert got.json() == {"keys": want.keys.tolist(), "distances": want.distances.tolist(),
                              "labels": want.labels.tolist()}
        assert key in got.json()["keys"][0]  # the image's own code is in the index: distance 0

        item = requests.get(service.url + f"item/{key}", timeout=TIMEOUT).json()
        assert item["code"] == index.encode([str(paths[-1])])[0].tobytes().hex()
        names = index.manifest["label_names"]
        assert item["label_name"] == names[item["label"]] and item["image"] == f"item/{key}/image"
        pic = requests.get(service.url + item["image"], timeout=TIMEOUT)
        assert pic.status_code == 200 and pic.headers["content-type"] == "image/png" and pic.content == png

    info = requests.get(service.url + "info", timeout=TIMEOUT).json()
    assert (info["bits"], info["count"], info["index_type"], info["shards"]) == (16, 480, "flat", 3)
    assert info["checkpoint"] == index.checkpoint and info["image_search"] and info["item_images"]
    assert info["limits"]["max_k"] == api.MAX_K
    assert requests.get(service.url + "healthz", timeout=TIMEOUT).json()["status"] == "ok"
    page = requests.get(service.url, timeout=TIMEOUT)
    assert page.status_code == 200 and 'id="results"' in page.text and "text/html" in page.headers["content-type"]


BAD = [  # (method, path, request kwargs, status, field)
    ("post", "search", {"json": {"codes": ["zz00"], "k": 5}}, 400, "codes[0]"),
    ("post", "search", {"json": {"codes": ["00ff", "00"], "k": 5}}, 400, "codes[1]"),
    ("post", "search", {"json": {"codes": [12], "k": 5}}, 400, "codes[0]"),
    ("post", "search", {"json": {"codes": [], "k": 5}}, 400, "codes"),
    ("post", "search", {"json": {"k": 5}}, 400, "codes"),
    ("post", "search", {"json": {"codes": ["0000"] * (api.MAX_CODES + 1)}}, 400, "codes"),
    ("post", "search", {"json": {"codes": ["0000"], "k": 0}}, 400, "k"),
    ("post", "search", {"json": {"codes": ["0000"], "k": -3}}, 400, "k"),
    ("post", "search", {"json": {"codes": ["0000"], "k": api.MAX_K + 1}}, 400, "k"),
    ("post", "search", {"json": {"codes": ["0000"], "k": 2.5}}, 400, "k"),
    ("post", "search", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "body"),
    ("post", "search", {"json": ["0000"]}, 400, "body"),
    ("post", "search", {"data": b" " * (api.MAX_BODY_BYTES + 1)}, 413, "body"),
    ("post", "range", {"json": {"codes": ["0000"], "radius": -1}}, 400, "radius"),
    ("post", "range", {"json": {"codes": ["0000"], "radius": 17}}, 400, "radius"),
    ("post", "range", {"json": {"codes": ["0000"]}}, 400, "radius"),
    ("post", "range", {"json": {"codes": ["0000"] * api.MAX_CODES, "radius": 16}}, 413, "radius"),
    ("post", "search/image", {"files": {"image": ("notes.txt", b"just some text", "text/plain")}}, 415, "image"),
    ("post", "search/image", {"files": {"image": ("big.png", _png_claiming(5000, 5000), "image/png")}}, 413, "image"),
    ("post", "search/image", {"files": {"picture": ("a.png", b"x", "image/png")}}, 400, "image"),
    ("post", "search/image", {"data": b"plain body"}, 400, "image"),
    ("post", "search/image?k=0", {"files": {"image": ("a.png", b"x", "image/png")}}, 400, "k"),
    ("post", "search/image", {"files": {"image": ("a.png", b"\0" * (api.MAX_UPLOAD_BYTES + 1), "image/png")}},
     413, "body"),
    ("get", "item/no-such-key", {}, 404, "key"),
    ("get", "nowhere", {}, 404, None),
    ("get", "search", {}, 405, None),
]


def test_bad_input_is_refused_with_the_field_and_the_service_stays_up(service):
    for method, path, kw, status, field in BAD:
        r = getattr(requests, method)(service.url + path, timeout=TIMEOUT, **kw)
        assert r.status_code == status, (path, kw.keys(), r.status_code, r.text[:300])
        body = r.json()
        assert body["field"] == field and len(body["error"]) > 20, (path, body)
    ok = _post(service.url + "search", json={"codes": ["0f0f"], "k": 3})
    assert ok.status_code == 200 and len(ok.json()["keys"][0]) == 3


def test_token_is_required_and_never_logged(auth_service, index_flat_indices):
    import ray

    url = auth_service.url
    body = {"codes": ["0000"], "k": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = _post(url + "search", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["field"] == "Authorization"
        assert requests.get(url + "item/x", headers=headers, timeout=TIMEOUT).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    r = _post(url + "search", json=body, headers=good)
    assert r.status_code == 200
    assert r.json()["keys"] == auth_service.index.search(np.zeros((1, 2), np.uint8), 4).keys.tolist()
    assert requests.get(url + "info", headers=good, timeout=TIMEOUT).json()["image_search"] is False
    no_model = _post(url + "search/image", headers=good, files={"image": ("a.png", b"x", "image/png")})
    assert no_model.status_code == 501 and "checkpoint" in no_model.json()["error"]
    page = requests.get(url, timeout=TIMEOUT)  # the page holds no data: served without the token, asks for it
    assert page.status_code == 200 and '<base href="/auth/">' in page.text

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"the token appears in Ray's logs: {leaked}"


def test_cli_help_teaches_and_refuses_a_token_argument(capsys):
    from rayhash.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for text in ("POST /search/image", "--replicas", "--token-file", "127.0.0.1", "Authorization: Bearer",
                 f"k <= {api.MAX_K}"):
        assert text in out
    with pytest.raises(SystemExit) as e:
        main(["serve", "--index", "x", "--token", "abc"])
    assert e.value.code == 2 and "--token-file" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (install Debian's `chromium` package: .ci/run "
                                             "does it with apt-get)")
def test_page_in_headless_chromium(service, serve_index, tmp_path):
    from playwright.sync_api import sync_playwright

    key, png = _dataset_images(serve_index[1], 1)[0]
    query = tmp_path / f"{key}.png"
    query.write_bytes(png)
    shot = Path(os.environ.get("RAYHASH_SERVE_SCREENSHOT", tmp_path / "serve-page.png"))
    names = service.index.manifest["label_names"]
    want = service.index.search_images([str(query)], 10)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.set_default_timeout(TIMEOUT * 1000)
            page.goto(service.url)
            page.wait_for_function("document.getElementById('info').textContent.includes('480 codes')")
            page.set_input_files("#file", str(query))
            page.wait_for_function("document.querySelectorAll('#results .hit img.thumb').length === 10 && "
                                   "[...document.querySelectorAll('#results .hit img.thumb')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            hits = page.locator("#results .hit")
            assert [hits.nth(i).get_attribute("data-key") for i in range(10)] == want.keys[0].tolist()
            assert hits.nth(0).locator(".label").inner_text() == names[want.labels[0][0]]
            assert hits.nth(0).locator(".dist").inner_text() == f"d = {want.distances[0][0]}"
            assert "10 nearest of 480 codes in" in page.inner_text("#status")
            page.screenshot(path=str(shot))
            second = hits.nth(3).get_attribute("data-key")  # click a result: search by its code
            hits.nth(3).click()
            page.wait_for_function(f"document.getElementById('status').textContent.includes({json.dumps(second)})")
            again = service.index.search(np.frombuffer(bytes.fromhex(
                requests.get(service.url + f"item/{second}", timeout=TIMEOUT).json()["code"]), np.uint8), 10)
            assert page.locator("#results .hit").first.get_attribute("data-key") == again.keys[0][0]
        finally:
            browser.close()
    assert shot.stat().st_size > 1000
