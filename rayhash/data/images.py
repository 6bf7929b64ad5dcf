"""Image decoding and the train / eval transforms shared by training, encoding and queries."""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "gif", "tif", "tiff")


def decode_image(data: bytes) -> Image.Image:
    """Decode JPEG/PNG/WebP/... bytes (grayscale, CMYK, palette, alpha alike) into an RGB PIL image.

    Raises ``ValueError`` for undecodable or truncated data (the whole image is decoded here, not lazily).
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error... for broken files
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from e
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, I, F, CMYK, YCbCr, 1


def _to_tensor_normalised():
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(IMAGE_MEAN, IMAGE_STD)]


def eval_transform(image_size: int | None) -> Callable:
    """PIL RGB -> float32 tensor (3,S,S): resize the short side to S, center crop, normalise.

    ``image_size=None`` keeps the native size (all images must then share it).
    """
    from torchvision import transforms as T

    steps = [] if image_size is None else [T.Resize(image_size), T.CenterCrop(image_size)]
    return T.Compose(steps + _to_tensor_normalised())


def train_transform(image_size: int | None, scale: tuple[float, float] = (0.6, 1.0)) -> Callable:
    """PIL RGB -> float32 tensor (3,S,S): random resized crop (``scale`` of the area), horizontal flip, normalise.

    ``image_size=None`` crops back to each image's native size.
    """
    from torchvision import transforms as T

    flip_norm = [T.RandomHorizontalFlip()] + _to_tensor_normalised()
    if image_size is not None:
        return T.Compose([T.RandomResizedCrop(image_size, scale=scale, antialias=True)] + flip_norm)
    rest = T.Compose(flip_norm)

    def native(img: Image.Image):
        crop = T.RandomResizedCrop((img.height, img.width), scale=scale, antialias=True)
        return rest(crop(img))

    return native


def raw_array(img: Image.Image, image_size: int | None) -> np.ndarray:
    """uint8 (H,W,3) array; resized (short side) and center-cropped to S when ``image_size`` is given."""
    if image_size is not None:
        from torchvision import transforms as T

        img = T.CenterCrop(image_size)(T.Resize(image_size)(img))
    return np.asarray(img, dtype=np.uint8)


def denormalise(x: np.ndarray) -> np.ndarray:
    """Inverse of the normalisation: float (3,S,S) -> uint8 (S,S,3) (for plots and checks)."""
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGE_STD, dtype=np.float32)[:, None, None]
    return np.clip(np.rint((x * std + mean) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
