"""Image decoding and the train / eval transforms shared by training, encoding and queries.

The transforms are PIL + numpy (no torch in Ray Data workers: lighter, and immune to half-imported torch in
reused workers); ``eval_transform`` / ``train_transform`` wrap them for single images as torch tensors.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from rayhash import settings

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "gif", "tif", "tiff")


def max_pixels() -> int:
    """Larger images are refused before decoding (decompression bombs): ``$RAYHASH_MAX_IMAGE_PIXELS``."""
    return int(settings.MAX_IMAGE_PIXELS.number())


def decode_image(data: bytes) -> Image.Image:
    """Decode JPEG/PNG/WebP/... bytes (grayscale, CMYK, palette, alpha, 16-bit and float alike) into an RGB PIL
    image, turned upright by its EXIF orientation.

    Raises ``ValueError`` for undecodable or truncated data (the whole image is decoded here, not lazily) and for
    images over :func:`max_pixels` (``$RAYHASH_MAX_IMAGE_PIXELS``, default 64 megapixels), which are refused from
    their header, before any pixel is decoded: a 100-KB PNG can claim 100 megapixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels():
            raise ValueError(f"image of {w}x{h} = {w * h / 1e6:.0f} megapixels is over the limit of "
                             f"{max_pixels() / 1e6:.0f} (raise ${settings.MAX_IMAGE_PIXELS.name} to accept it)")
        img.load()
        img = ImageOps.exif_transpose(img)
    except ValueError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, DecompressionBomb*... for bad files
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from e
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, 1


def _to_uint8(x: np.ndarray, mode: str) -> np.ndarray:
    """Scale, not clip: 16-bit (I;16*, or I holding values past 255) by 255/65535; float (F) in [0, 1] by 255."""
    x = x.astype(np.float64)
    if mode == "F":
        finite = x[np.isfinite(x)]
        if finite.size and finite.max() <= 1.0:
            x = x * 255.0
    elif mode.startswith("I;16") or (x.size and x.max() > 255):
        x = x * (255.0 / 65535.0)
    return np.clip(np.rint(np.nan_to_num(x)), 0, 255).astype(np.uint8)


def _resize_short(img: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (long side truncated, as torchvision's ``Resize(int)``)."""
    w, h = img.size
    if max(w, h) > _MAX_ASPECT * min(w, h):  # a 1x20000 strip: keep the central part the crop can use
        box = ((0, (h - _MAX_ASPECT * w) // 2, w, (h + _MAX_ASPECT * w) // 2) if w <= h else
               ((w - _MAX_ASPECT * h) // 2, 0, (w + _MAX_ASPECT * h) // 2, h))
        img, (w, h) = img.crop(box), (box[2] - box[0], box[3] - box[1])
    if min(w, h) == size:
        return img
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img.resize((nw, nh), Image.BILINEAR)


_MAX_ASPECT = 4  # beyond this, resizing the short side to S would make a huge image that the crop mostly drops


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_chw(img: Image.Image) -> np.ndarray:
    """RGB PIL -> uint8 (3,H,W). Images stay uint8 through the object store and onto the device (a quarter of the
    bytes of float32); the network normalises them there (``rayhash.model.network.normalise_images``)."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def eval_array(img: Image.Image, image_size: int | None) -> np.ndarray:
    """Eval transform as numpy: resize the short side to S, center crop -> uint8 (3,S,S)."""
    if image_size is not None:
        img = _center_crop(_resize_short(img, image_size), image_size)
    return to_chw(img)


def _random_resized_box(w: int, h: int, scale: tuple[float, float], rng: np.random.Generator):
    """torchvision's RandomResizedCrop box sampling (aspect ratio 3/4..4/3): (left, top, width, height)."""
    area, log_ratio = w * h, (np.log(3 / 4), np.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    cw, ch = (w, int(round(w * 3 / 4))) if w / h < 3 / 4 else (int(round(h * 4 / 3)), h) if w / h > 4 / 3 else (w, h)
    cw, ch = min(cw, w), min(ch, h)
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def train_array(img: Image.Image, image_size: int | None, rng: np.random.Generator | None = None,
                scale: tuple[float, float] = (0.6, 1.0)) -> np.ndarray:
    """Train transform as numpy: random resized crop (``scale`` of the area, to S or the native size),
    horizontal flip with p=0.5 -> uint8 (3,S,S)."""
    rng = rng if rng is not None else np.random.default_rng()
    w, h = img.size
    left, top, cw, ch = _random_resized_box(w, h, scale, rng)
    out = (image_size, image_size) if image_size is not None else (w, h)
    img = img.resize(out, Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_chw(img)


def eval_transform(image_size: int | None) -> Callable:
    """PIL RGB -> torch uint8 (3,S,S): resize the short side to S, center crop
    (``image_size=None`` keeps the native size). The same numbers as ``read_shards(mode="eval")``."""

    def transform(img: Image.Image):
        import torch

        return torch.from_numpy(eval_array(img, image_size))

    return transform


def train_transform(image_size: int | None, scale: tuple[float, float] = (0.6, 1.0)) -> Callable:
    """PIL RGB -> torch uint8 (3,S,S): random resized crop + horizontal flip (as
    ``read_shards(mode="train")``); ``image_size=None`` crops back to the native size."""

    def transform(img: Image.Image):
        import torch

        return torch.from_numpy(train_array(img, image_size, scale=scale))

    return transform


def raw_array(img: Image.Image, image_size: int | None) -> np.ndarray:
    """uint8 (H,W,3) array; resized (short side) and center-cropped to S when ``image_size`` is given."""
    if image_size is not None:
        img = _center_crop(_resize_short(img, image_size), image_size)
    return np.asarray(img, dtype=np.uint8)
