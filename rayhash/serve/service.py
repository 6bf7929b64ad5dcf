"""The Ray Serve application: an HTTP deployment (:class:`Api`: routes, limits, token, the page) in front of the
index's shard-group actors (one :class:`~rayhash.index.ShardedIndex` opened in ``ray`` mode by the driver, shared by
every replica) and of an :class:`ImageEncoder` deployment that encodes uploads with the index's checkpoint in
batches (``@serve.batch``)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from rayhash.serve import api
from rayhash.serve.api import ApiError
from rayhash.serve.items import ItemTable
from rayhash.runtime import get_logger

log = get_logger("rayhash.serve")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
ENCODE_BATCH, ENCODE_WAIT_S = 16, 0.01  # @serve.batch: images per model call, seconds a batch waits to fill
MAX_ONGOING = 64  # requests one replica takes at once (batches fill from these)
ROUTES = "GET / | GET /healthz | GET /info | POST /search | POST /search/image?k= | POST /range | GET /item/KEY[/image]"


def token_digest(token: str | None) -> str | None:
    """What the replicas keep of the token: its sha256 (the token itself never enters Serve's configuration)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class ImageEncoder:
    """Images (uint8 HxWx3) -> packed codes, with the checkpoint of the index (``ShardedIndex.encode``), batched."""

    def __init__(self, index) -> None:
        self.index = index
        index.encode([])  # loads the checkpoint now, and refuses one of another code width

    @serve.batch(max_batch_size=ENCODE_BATCH, batch_wait_timeout_s=ENCODE_WAIT_S)
    async def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        codes = await asyncio.to_thread(self.index.encode, images)
        log.debug("encoded a batch of %d image(s)", len(images))
        return list(codes)


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class Api:
    """The HTTP API and the page; see the README's Serve section."""

    def __init__(self, index, items: list, encoder, token_sha256: str | None, max_pixels: int) -> None:
        import ray

        from rayhash.data.images import max_pixels as decoder_limit

        self.index, self.encoder, self.token = index, encoder, token_sha256
        self.items: ItemTable = ray.get(items[0])  # zero-copy arrays from the object store
        self.max_pixels = min(max_pixels, decoder_limit())
        self.label_names = list(index.manifest.get("label_names") or [])
        self.page = resources.files("rayhash.serve").joinpath("page.html").read_text()

    # ------------------------------------------------------------------ dispatch
    async def __call__(self, request):
        root = request.scope.get("root_path", "")
        path = request.url.path[len(root):] if root and request.url.path.startswith(root) else request.url.path
        try:
            if request.method == "GET" and path in ("", "/", "/index.html"):  # static, holds no data
                return HTMLResponse(self.page.replace("{{BASE}}", root.rstrip("/") + "/"))
            if not self._authorized(request):
                return JSONResponse({"error": "this service needs a token: send the header Authorization: Bearer "
                                              "<token>", "field": "Authorization"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await self._route(request, path)
        except ApiError as e:
            return JSONResponse(e.body(), e.status)
        except Exception as e:  # a bug or a dead shard actor: an answer, never a crashed replica
            log.exception("%s %s failed", request.method, path)
            return JSONResponse({"error": f"internal error ({type(e).__name__}: {e}); see the service log",
                                 "field": None}, 500)

    def _authorized(self, request) -> bool:
        if self.token is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token_digest(value.strip()) or "", self.token)

    async def _route(self, request, path: str):
        routes = {("GET", "/healthz"): self._healthz, ("GET", "/info"): self._info,
                  ("POST", "/search"): self._search, ("POST", "/search/image"): self._search_image,
                  ("POST", "/range"): self._range}
        handler = routes.get((request.method, path))
        if handler is None and request.method == "GET" and path.startswith("/item/"):
            return self._item(path[len("/item/"):])
        if handler is None:
            known = {p for _, p in routes} | {"/item/KEY"}
            status = 405 if path in known or path.startswith("/item/") else 404
            raise ApiError(status, None, f"no route {request.method} {path}; this service answers {ROUTES}")
        return await handler(request)

    # ------------------------------------------------------------------ routes
    async def _healthz(self, request):
        return JSONResponse({"status": "ok", "count": self.index.ntotal})

    async def _info(self, request):
        idx = self.index
        return JSONResponse({
            "bits": idx.bits, "count": idx.ntotal, "index_type": idx.index_type, "shards": idx.num_shards,
            "checkpoint": idx.checkpoint, "image_search": self.encoder is not None,
            "item_images": self.items.has_images(), "item_codes": self.items.codes is not None,
            "label_names": self.label_names,
            "limits": {"max_k": api.MAX_K, "max_codes": api.MAX_CODES, "max_range_hits": api.MAX_RANGE_HITS,
                       "max_body_bytes": api.MAX_BODY_BYTES, "max_upload_bytes": api.MAX_UPLOAD_BYTES,
                       "max_pixels": self.max_pixels}})

    async def _search(self, request):
        body = api.parse_json(await self._body(request, api.MAX_BODY_BYTES))
        q, k = api.parse_codes(body.get("codes"), self.index.bits), api.parse_k(body.get("k"))
        return await self._searched(q, k, {})

    async def _range(self, request):
        body = api.parse_json(await self._body(request, api.MAX_BODY_BYTES))
        q = api.parse_codes(body.get("codes"), self.index.bits)
        radius = api.parse_radius(body.get("radius"), self.index.bits)
        t0 = time.perf_counter()
        res = await asyncio.to_thread(self.index.range_search, q, radius)
        hits = int(res.lims[-1])
        if hits > api.MAX_RANGE_HITS:
            raise ApiError(413, "radius", f"radius {radius} reaches {hits} codes, over the limit of "
                                          f"{api.MAX_RANGE_HITS} per request; lower the radius or send fewer codes")
        return JSONResponse(api.range_json(res), headers=_timing(search=time.perf_counter() - t0))

    async def _search_image(self, request):
        k = api.parse_k(request.query_params.get("k"))
        if self.encoder is None:
            raise ApiError(501, "image", f"index {self.index.path} records no checkpoint, so this service cannot "
                                         "encode images; search with POST /search and codes instead")
        body = await self._body(request, api.MAX_UPLOAD_BYTES)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
        except Exception as e:
            raise ApiError(400, "image", f"the body is not a multipart form ({e}); send the file as the form field "
                                         "`image`, e.g. curl -F image=@photo.jpg") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "image", "no file in the form field `image`; send it as multipart/form-data, e.g. "
                                         "curl -F image=@photo.jpg 'http://HOST:PORT/search/image?k=10'")
        data = await upload.read()
        t0 = time.perf_counter()
        image = await asyncio.to_thread(self._decode, data)
        code = await self.encoder.remote(image)
        return await self._searched(code[None, :], k, {"encode": time.perf_counter() - t0})

    def _decode(self, data: bytes) -> np.ndarray:
        from rayhash.data import decode_image

        api.image_pixels(data, self.max_pixels)
        try:
            return np.asarray(decode_image(data), dtype=np.uint8)
        except ValueError as e:
            raise ApiError(415, "image", f"the uploaded image cannot be decoded: {e}; upload a complete JPEG, PNG "
                                         "or WebP file") from None

    def _item(self, rest: str):
        key, want_image = rest, False
        row = self.items.find(key)
        if row is None and rest.endswith("/image"):
            key, want_image = rest[:-len("/image")], True
            row = self.items.find(key)
        if row is None:
            raise ApiError(404, "key", f"no item with key {key!r} in this index; keys are those that /search returns")
        if want_image:
            image = self.items.image(row)
            if image is None:
                why = ("start the service with --data DS/SPLIT (the dataset split the codes were encoded from)"
                       if not self.items.has_images() else "the --data split has no image under this key")
                raise ApiError(404, "key", f"no image for item {key!r}: {why}")
            return Response(image[0], media_type=image[1], headers={"Cache-Control": "max-age=3600"})
        label = int(self.items.labels[row])
        name = self.label_names[label] if 0 <= label < len(self.label_names) else None
        return JSONResponse({"key": key, "label": label, "label_name": name, "code": self.items.code_hex(row),
                             "image": f"item/{key}/image" if self.items.image_tar[row] >= 0 else None})

    # ------------------------------------------------------------------ helpers
    async def _searched(self, q: np.ndarray, k: int, timing: dict[str, float]):
        t0 = time.perf_counter()
        res = await asyncio.to_thread(self.index.search, q, k)
        return JSONResponse(api.search_json(res), headers=_timing(**timing, search=time.perf_counter() - t0))

    @staticmethod
    async def _body(request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit():
            api.check_size(int(declared), limit)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            api.check_size(n, limit)
            chunks.append(chunk)
        return b"".join(chunks)


def _timing(**seconds: float) -> dict[str, str]:
    """A ``Server-Timing`` header (milliseconds per step), which the page shows as the query time."""
    return {"Server-Timing": ", ".join(f"{name};dur={s * 1e3:.2f}" for name, s in seconds.items())}


def build_app(index, items_ref, *, replicas: int = 1, token: str | None = None, replica_gpus: float = 0.0,
              max_pixels: int = api.MAX_PIXELS):
    """The bound application over an opened ``ray``-mode index and its :class:`ItemTable` in the object store
    (``items_ref``); ``replicas`` of each deployment: API replicas reserve no CPU (routing, JSON, decoding), encoder
    replicas one CPU (and ``replica_gpus`` GPUs) each."""
    encoder = None
    if index.checkpoint:
        encoder = ImageEncoder.options(num_replicas=replicas, ray_actor_options={
            "num_cpus": 1, "num_gpus": replica_gpus}).bind(index)
    return Api.options(num_replicas=replicas, ray_actor_options={"num_cpus": 0}).bind(
        index, [items_ref], encoder, token_digest(token), max_pixels)


@dataclass
class Service:
    """A running service: its ``url``, the driver's ``index`` (the same shard actors the replicas search)."""

    url: str
    name: str
    index: Any
    items_ref: Any

    def stop(self) -> None:
        """Delete the application and release the index actors (Serve itself keeps running for other apps)."""
        serve.delete(self.name)
        self.index.close()


def service_token(token_file: str | None = None) -> str | None:
    """The service's token: from ``token_file`` (private: chmod 600; ``-`` reads standard input), else
    ``$RAYHASH_TOKEN``; None: no token asked."""
    from rayhash import settings
    from rayhash.submit import read_token_file

    if token_file:
        return read_token_file(token_file)
    return (settings.TOKEN.get() or "").strip() or None


def _open(index: str, data: str | None, address: str | None = None):
    """The index on Ray actors and its :class:`ItemTable` put in the object store."""
    import ray

    from rayhash.index import ShardedIndex
    from rayhash.runtime import init_ray

    init_ray(address)
    idx = ShardedIndex.open(index, mode="ray")
    try:
        return idx, ray.put(ItemTable.build(idx, data))
    except BaseException:
        idx.close()
        raise


def start_service(index: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, replicas: int = 1,
                  data: str | None = None, token: str | None = None, replica_gpus: float = 0.0,
                  max_pixels: int = api.MAX_PIXELS, name: str = "rayhash", route_prefix: str = "/",
                  address: str | None = None) -> Service:
    """Open ``index`` on Ray actors, read its items (and with ``data`` where their images are), start Ray Serve on
    ``host:port`` (when it is not running yet) and deploy the application ``name`` at ``route_prefix``. Returns when
    every replica is up. ``token``: required of every API request as ``Authorization: Bearer``."""
    idx, items_ref = _open(index, data, address)
    try:
        _check_room(replicas if idx.checkpoint else 0, replica_gpus, address)
        serve.start(http_options={"host": host, "port": port})
        _check_http(host, port)
        serve.run(build_app(idx, items_ref, replicas=replicas, token=token, replica_gpus=replica_gpus,
                            max_pixels=max_pixels), name=name, route_prefix=route_prefix, blocking=False)
    except BaseException:
        idx.close()
        raise
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}/"
    log.info("%s: %s index of %d codes served at %s%s", index, idx.index_type, idx.ntotal, url,
             " (token required)" if token else "")
    return Service(url, name, idx, items_ref)


def app(args: dict[str, str]):
    """Application builder for Ray Serve's own CLI, which keeps this process (the owner of the index actors)
    running: ``serve run rayhash.serve:app index=INDEX [data=DS/split] [replicas=N] [token_file=F]``
    (on 127.0.0.1:8000, or where ``serve start --http-host/--http-port`` put Serve; ``$RAYHASH_TOKEN`` as with
    ``rayhash serve``)."""
    unknown = set(args) - {"index", "data", "replicas", "token_file"}
    if unknown or "index" not in args:
        raise ValueError(f"serve run rayhash.serve:app takes index=INDEX [data=DS/split] [replicas=N] "
                         f"[token_file=F]; got {sorted(args)}")
    idx, items_ref = _open(args["index"], args.get("data"))
    return build_app(idx, items_ref, replicas=int(args.get("replicas", 1)), token=service_token(args.get("token_file")))


def _check_room(encoders: int, gpus: float, address: str | None) -> None:
    """Encoder replicas that cannot be placed would leave the deployment waiting forever: an error on a local
    instance, a warning on a cluster (an autoscaler may add nodes)."""
    import ray

    from rayhash.runtime import ray_address

    need = {"CPU": float(encoders), "GPU": encoders * gpus}
    for _ in range(20):  # the resource view lags a moment behind tasks that just finished (the tar scans)
        free = ray.available_resources()
        short = {r: (n, free.get(r, 0.0)) for r, n in need.items() if n > free.get(r, 0.0) + 1e-9}
        if not short:
            return
        time.sleep(0.5)
    msg = (f"{encoders} image-encoder replica(s) need " + ", ".join(f"{n:g} {r}" for r, (n, _) in short.items())
           + " but this Ray cluster has " + ", ".join(f"{f:g} {r}" for r, (_, f) in short.items())
           + " free (the index's shard actors hold one CPU each); pass fewer --replicas or --replica-gpus")
    if not ray_address(address):
        raise ValueError(msg)
    log.warning("%s; deploying in case the cluster autoscales", msg)


def _check_http(host: str, port: int) -> None:
    """Serve keeps the address it was first started with; refuse to report another one."""
    try:
        from ray.serve.context import _get_global_client

        cfg = _get_global_client().http_config
        have = (cfg.host, int(cfg.port))
    except Exception:  # a Serve without this internal API: trust the request
        return
    if have != (host, port):
        raise ValueError(f"Ray Serve already runs on this Ray cluster at {have[0]}:{have[1]}, not {host}:{port}; "
                         f"pass --host {have[0]} --port {have[1]}, or stop it first (serve shutdown)")
