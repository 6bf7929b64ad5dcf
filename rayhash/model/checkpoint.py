"""Checkpoint folders (model.pt + meta.json + config.yaml [+ train_state.pt]) and the inference Encoder."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from rayhash import storage
from rayhash.layout import CheckpointDir, RunDir
from rayhash.model.network import HashNet

STATE_FILE = CheckpointDir.STATE  # the training loop's resume state, beside the model files


def save_model_files(directory: str, model: torch.nn.Module, config, meta: dict[str, Any]) -> None:
    """Write model.pt (unwrapped state_dict), meta.json and config.yaml into ``directory`` (local or URI)."""
    model, ckpt = getattr(model, "module", model), CheckpointDir.of(directory)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(ckpt.model, buf.getvalue())
    storage.write_json(ckpt.meta, meta)
    storage.write_bytes(ckpt.config, config.to_yaml().encode())


def checkpoint_dir(path: str | os.PathLike) -> CheckpointDir:
    """The checkpoint folder for a run dir (-> RUN/final) or a checkpoint dir; clear error otherwise."""
    for ckpt in (CheckpointDir.of(path), RunDir.of(path).final):
        if storage.exists(ckpt.model):
            return ckpt
    raise FileNotFoundError(f"checkpoint: no {CheckpointDir.MODEL} in {path} or {RunDir.of(path).final}; pass a run "
                            "folder written by `rayhash train --out RUN` (or its final/ checkpoint)")


@dataclass
class LoadedModel:
    model: HashNet
    config: Any  # rayhash.config.RunConfig
    bits: int
    image_size: int
    label_names: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    path: str = ""
    digest: str = ""  # sha256 of model.pt: what the codes it makes are keyed on (not the path, which retraining reuses)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a trained HashNet (eval mode) from a run folder or a checkpoint folder (local or s3:// / gs://)."""
    from rayhash.config import load_config

    ckpt = checkpoint_dir(path)
    meta = ckpt.read_meta()  # typed: num_classes, label_names (rayhash.layout.CheckpointMeta)
    with tempfile.TemporaryDirectory(prefix="rayhash-ckpt-") as tmp:
        cfg_path = os.path.join(tmp, CheckpointDir.CONFIG)
        with open(cfg_path, "wb") as f:
            f.write(storage.read_bytes(ckpt.config))
        config = load_config(cfg_path)
    weights = storage.read_bytes(ckpt.model)
    state = torch.load(io.BytesIO(weights), map_location=map_location, weights_only=True)
    model = HashNet.from_config(config.model.model_copy(update={"pretrained": None}), meta.num_classes)
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model=model, config=config, bits=config.model.bits, image_size=config.data.image_size,
                       label_names=list(meta.label_names or []), meta=meta, path=str(ckpt),
                       digest=hashlib.sha256(weights).hexdigest())


class Encoder:
    """Images -> (continuous z, packed binary codes) with a trained checkpoint; CUDA when available."""

    def __init__(self, checkpoint: str | os.PathLike | LoadedModel, device: str | torch.device | None = None):
        from rayhash.runtime import bf16_inference, torch_device

        self.loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_checkpoint(checkpoint)
        self.device = torch.device(device) if device is not None else torch_device()
        self.model = self.loaded.model.to(self.device).eval()
        self.bits, self.image_size = self.loaded.bits, self.loaded.image_size
        self.autocast = bf16_inference(self.device)
        self._transform = None

    @torch.inference_mode()
    def encode_tensor(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """x: uint8 (n,3,S,S) images (or float, already normalised) -> (z float32 (n,bits), packed uint8 (n,bits/8)).

        On a GPU with bf16 the backbone runs under bf16 autocast (the hash layer stays float32, see ``HashNet``);
        ``autocast=False`` on the encoder gives float32 throughout."""
        from rayhash.metrics import pack_codes

        x = torch.as_tensor(x)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            z, _ = self.model(x.to(self.device, non_blocking=True))
        z = z.float().cpu().numpy()
        return z, pack_codes(z)

    def encode_images(self, items: Sequence[Any], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Images (see :func:`_as_image`: paths/URIs, PIL images, uint8 arrays, image file bytes) -> (z, packed
        codes)."""
        from rayhash.data import eval_transform

        if self._transform is None:
            self._transform = eval_transform(self.image_size)
        zs, codes = [], []
        for start in range(0, len(items), batch_size):
            batch = []
            for i, item in enumerate(items[start:start + batch_size], start):
                batch.append(self._transform(_as_image(item, i).convert("RGB")))
            z, c = self.encode_tensor(torch.stack(batch))
            zs.append(z)
            codes.append(c)
        if not zs:
            return np.zeros((0, self.bits), np.float32), np.zeros((0, self.bits // 8), np.uint8)
        return np.concatenate(zs), np.concatenate(codes)


def _as_image(item: Any, i: int):
    """A PIL image of ``item`` (number ``i`` in its list): a PIL image, a uint8 array (H, W, 3) or (H, W), the raw
    bytes of an image file, or a path / URI of one."""
    from PIL import Image

    from rayhash.data import decode_image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image {i}: array of dtype {item.dtype} and shape {item.shape}; pass uint8 pixels "
                             "(H, W, 3) or (H, W)")
        return Image.fromarray(item.squeeze(2) if item.ndim == 3 and item.shape[2] == 1 else item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image(bytes(item))
    if isinstance(item, (str, os.PathLike)):
        return decode_image(storage.read_bytes(str(item)))
    raise ValueError(f"image {i}: {type(item).__name__} is not an image; pass a path or URI, a PIL image, a uint8 "
                     "array or the bytes of an image file")
