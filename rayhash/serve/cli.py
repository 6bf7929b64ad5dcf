"""``rayhash serve`` (imports nothing heavy at module level)."""
from __future__ import annotations

import argparse

from rayhash.cliargs import RefuseToken, nonnegative_float, positive_int

SERVE_HELP = """\
Serve an index over HTTP with Ray Serve until interrupted: a JSON API and a search page at http://HOST:PORT/.
The index's shard groups are Ray actors (as ShardedIndex.open(mode="ray")); uploaded images are encoded with the
checkpoint recorded in the index's manifest, in batches, by --replicas encoder replicas.

API (JSON; errors are 4xx {{"error": what to send instead, "field": the field at fault}}):
  POST /search         {{"codes": ["<hex of a packed code>", ...], "k": 10}} -> {{"keys", "distances", "labels"}}
  POST /search/image   multipart field `image`, query ?k=10                  -> the same for the image
  POST /range          {{"codes": [...], "radius": 2}}                         -> every code within the radius
  GET  /item/KEY       label, label name, code;  GET /item/KEY/image: the image bytes (needs --data)
  GET  /healthz, /info (bits, count, index type, checkpoint, limits);  GET /  the page
limits: k <= {max_k}, {max_codes} codes a request, JSON bodies <= {max_body} KiB, uploads <= {max_upload} MiB and
        <= --max-pixels pixels, /range <= {max_hits} hits a request

Binds 127.0.0.1 (this machine only) unless --host says otherwise. With a token ($RAYHASH_TOKEN, or --token-file
F) every request but the page must send `Authorization: Bearer TOKEN`, else 401; the token is never logged.

examples:
  rayhash serve --index runs/demo/index --data runs/demo/data/train
  curl -s localhost:8000/info
  curl -s -F image=@photo.jpg 'localhost:8000/search/image?k=5'
  rayhash submit serve --index s3://bucket/index/in64 --replicas 4     # as a Ray job on a cluster
  serve run rayhash.serve:app index=INDEX data=DS/train                 # with Ray Serve's own CLI"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from rayhash.serve import api

    text = SERVE_HELP.format(max_k=api.MAX_K, max_codes=api.MAX_CODES, max_body=api.MAX_BODY_BYTES >> 10,
                             max_upload=api.MAX_UPLOAD_BYTES >> 20, max_hits=api.MAX_RANGE_HITS)
    p = subparsers.add_parser("serve", help="serve an index over HTTP (Ray Serve): JSON API and search page",
                              description=text, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index folder or URI (from `rayhash index build`)")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface, "
                        "then set a token)")
    p.add_argument("--replicas", type=positive_int, default=1,
                   help="replicas of the API and of the image encoder (default: 1); the shard actors are shared")
    p.add_argument("--replica-gpus", type=nonnegative_float, default=0.0,
                   help="GPUs per image-encoder replica (default: 0, encode on CPU)")
    p.add_argument("--data", help="dataset split whose images the hits are (DS/train, as given to `rayhash "
                                  "encode`): enables GET /item/KEY/image and the page's thumbnails")
    p.add_argument("--token-file", help="file holding the token every request must send (chmod 600; - reads "
                                        "standard input); default: $RAYHASH_TOKEN, else no token")
    p.add_argument("--token", action=RefuseToken, help=argparse.SUPPRESS)
    p.add_argument("--max-pixels", type=positive_int, default=api.MAX_PIXELS,
                   help=f"largest upload, width x height (default: {api.MAX_PIXELS})")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import sys
    import time

    from rayhash.serve import service_token, start_service

    token = service_token(args.token_file)
    service = start_service(args.index, host=args.host, port=args.port, replicas=args.replicas, data=args.data,
                            token=token, replica_gpus=args.replica_gpus, max_pixels=args.max_pixels,
                            address=args.address)
    # SIGTERM (`rayhash stop JOB`, kill) takes the application down too; set after ray.init, whose own handler
    # would otherwise end the process before the clean-up runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving {args.index} at {service.url}{' (token required)' if token else ''}; Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        _shutdown_idle_serve()
    return 0


def _shutdown_idle_serve() -> None:
    """Stop Ray Serve when no application is left on it (ours was the last)."""
    from ray import serve

    if not serve.status().applications:
        serve.shutdown()
