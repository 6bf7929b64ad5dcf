"""The HTTP API's request rules, in one place and without Ray: limits, parsing of codes / k / radius / uploads, and
the JSON shape of results. Every refusal is an :class:`ApiError` (status, the field it is about, what to send
instead), turned into ``{"error": ..., "field": ...}`` by the service."""
from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_K = 1000  # hits per query of /search and /search/image
MAX_CODES = 1024  # query codes per request of /search and /range
MAX_RANGE_HITS = 100_000  # hits per /range request, all queries together
MAX_BODY_BYTES = 1 << 20  # JSON bodies of /search and /range
MAX_UPLOAD_BYTES = 20 << 20  # multipart bodies of /search/image
MAX_PIXELS = 16_000_000  # uploaded images (width x height), refused from their header before decoding
DEFAULT_K = 10

_HEX = re.compile(r"[0-9a-fA-F]*")


@dataclass
class ApiError(Exception):
    """A request the service refuses: HTTP ``status``, the request ``field`` at fault, and the message with the fix."""

    status: int
    field: str | None
    message: str

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


def check_size(n: int, limit: int, field: str = "body") -> None:
    if n > limit:
        raise ApiError(413, field, f"the request body has over {limit} bytes (the limit of this endpoint); send "
                                   "fewer codes per request, or a smaller image file")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "body", f"the body is not valid JSON ({e}); send a JSON object such as "
                                    '{"codes": ["0f3a..."], "k": 10} with Content-Type: application/json') from None
    if not isinstance(obj, dict):
        raise ApiError(400, "body", f"the body is a JSON {type(obj).__name__}, expected an object such as "
                                    '{"codes": ["0f3a..."], "k": 10}')
    return obj


def parse_codes(value: Any, bits: int) -> np.ndarray:
    """``["<hex>", ...]`` -> packed uint8 codes (n, bits/8): each code is the hex of its ``bits/8`` bytes (what
    ``code.tobytes().hex()`` gives for a row of ``np.packbits`` of the sign bits)."""
    nbytes = bits // 8
    example = f'{{"codes": ["{"0" * 2 * nbytes}"]}}'
    if not isinstance(value, list) or not value:
        raise ApiError(400, "codes", f"codes must be a non-empty list of hex strings, got {_show(value)}; send "
                                     f"e.g. {example}")
    if len(value) > MAX_CODES:
        raise ApiError(400, "codes", f"{len(value)} codes in one request; at most {MAX_CODES}: split the request")
    out = np.empty((len(value), nbytes), np.uint8)
    for i, code in enumerate(value):
        field = f"codes[{i}]"
        if not isinstance(code, str):
            raise ApiError(400, field, f"{field} is {_show(code)}, not a string; send each code as a hex string "
                                       f"of {2 * nbytes} digits")
        if not _HEX.fullmatch(code):
            raise ApiError(400, field, f"{field} = {_show(code)} is not hexadecimal; send the code's {nbytes} "
                                       f"bytes as {2 * nbytes} hex digits (0-9, a-f), e.g. code.tobytes().hex()")
        if len(code) != 2 * nbytes:
            raise ApiError(400, field, f"{field} has {len(code)} hex digits, this index holds {bits}-bit codes: "
                                       f"send {2 * nbytes} hex digits ({nbytes} bytes) per code, encoded with the "
                                       "checkpoint this index was built from")
        out[i] = np.frombuffer(bytes.fromhex(code), np.uint8)
    return out


def _int_in(value: Any, field: str, low: int, high: int, rule: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, field, f"{field} must be an integer, got {_show(value)}; {rule}")
    if not low <= value <= high:
        raise ApiError(400, field, f"{field} = {value} is out of range; {rule}")
    return value


def parse_k(value: Any) -> int:
    """Hits per query: 1..MAX_K (default DEFAULT_K)."""
    if value is None:
        return DEFAULT_K
    return _int_in(value, "k", 1, MAX_K, f"send k from 1 to {MAX_K} (the service's limit)")


def parse_radius(value: Any, bits: int) -> int:
    """A Hamming radius: 0..bits."""
    if value is None:
        raise ApiError(400, "radius", f'radius is missing; send e.g. {{"codes": [...], "radius": 2}} (0 to {bits})')
    return _int_in(value, "radius", 0, bits, f"send a radius from 0 to {bits} (the code length)")


def image_pixels(data: bytes, limit: int) -> None:
    """Refuse an upload that is not an image, or whose header claims more than ``limit`` pixels (before decoding)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError:
        w, h = Image.MAX_IMAGE_PIXELS, 2  # PIL refuses to open past twice its own limit: surely over ours
    except Exception as e:
        raise ApiError(415, "image", f"the uploaded file is not an image PIL can read ({type(e).__name__}); "
                                     "upload a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None
    if w * h > limit:
        raise ApiError(413, "image", f"the image has {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                                     f"{limit / 1e6:.1f}; upload a smaller image (scale it down first)")


def search_json(res) -> dict[str, list]:
    """A :class:`SearchResult` as JSON lists: keys (null where fewer than k codes exist), distances (-1 there),
    labels (-1 there or when unlabelled), one row per query."""
    return {"keys": res.keys.tolist(), "distances": res.distances.tolist(), "labels": res.labels.tolist()}


def range_json(res) -> dict[str, list]:
    """A :class:`RangeResult` as the same per-query lists as :func:`search_json` (rows of varying length)."""
    rows = list(zip(res.lims[:-1].tolist(), res.lims[1:].tolist()))
    return {name: [getattr(res, name)[a:b].tolist() for a, b in rows] for name in ("keys", "distances", "labels")}


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
