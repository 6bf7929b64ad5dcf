"""FAISS on GPUs: whether flat shards may be copied to one here (the installed wheel's kernels against the GPU's
compute capability), the shared GPU resources, and the lock that keeps FAISS GPU searches one at a time."""
from __future__ import annotations

import threading

import numpy as np

from rayhash import settings
from rayhash.runtime import get_logger, ray_gave_no_gpu

log = get_logger("rayhash.index")

GPU_MAX_K = 2048  # faiss GPU k-selection limit
_GPU_RES = None


# The compute capabilities each faiss GPU wheel has kernels for, read from the wheels with `cuobjdump --list-elf`
# and `--list-ptx`: (lowest, highest), highest None when the wheel carries PTX that newer GPUs JIT-compile.
FAISS_GPU_WHEELS = {
    "faiss-gpu-cu12": ((7, 0), (8, 9)),  # 1.14.1.post1: SASS for sm_70 and sm_80, no PTX; CUDA 12 (H100: aborts)
    "faiss-gpu-cuvs": ((7, 5), None),    # 1.15.1: SASS for sm_75, 80, 86, 89, 90 and compute_90 PTX; CUDA 13.2
}
_GPU_LOCK = threading.Lock()  # FAISS GPU indices are not thread-safe, even for searches: one search at a time


def faiss_gpu_wheel() -> tuple[str, tuple[int, int], tuple[int, int] | None] | None:
    """(distribution, lowest, highest compute capability) of the installed faiss GPU wheel, when it is one of
    :data:`FAISS_GPU_WHEELS`; None for faiss-cpu, conda or source builds (whose targets pip metadata cannot tell)."""
    from importlib.metadata import PackageNotFoundError, version

    for name, (low, high) in FAISS_GPU_WHEELS.items():
        try:
            version(name)
        except PackageNotFoundError:
            continue
        return name, low, high
    return None


def faiss_gpu_usable() -> bool:
    """Whether flat shards may be copied to a GPU here: faiss sees a GPU, Ray gave this worker one (or this is a
    driver), and the GPU is one the installed faiss wheel has kernels for. On another GPU (faiss-gpu-cu12 on an
    H100, compute capability 9.0) the first kernel launch would abort the process inside FAISS, with no Python
    exception to fall back from, so the CPU index is used and a warning says so; ``RAYHASH_FAISS_GPU=force``
    overrides."""
    import faiss

    if ray_gave_no_gpu() or not hasattr(faiss, "GpuIndexBinaryFlat") or faiss.get_num_gpus() == 0:
        return False
    cc = gpu_capability()
    if cc is None:  # cannot tell which GPU this is
        return False
    wheel = faiss_gpu_wheel()
    if wheel and settings.FAISS_GPU.get() != "force":
        name, low, high = wheel
        if cc < low or (high is not None and cc > high):
            top = f"{high[0]}.{high[1]}" if high else "newer"
            log.warning("GPU compute capability %d.%d is outside what %s has kernels for (%d.%d to %s): searching on "
                        "CPU. faiss-gpu-cuvs 1.15 (CUDA 13.2) covers 7.5 to 9.0 and newer; RAYHASH_FAISS_GPU=force "
                        "skips this check", *cc, name, *low, top)
            return False
    return True


def gpu_capability(device: int = 0) -> tuple[int, int] | None:
    """Compute capability of visible GPU ``device`` from the CUDA driver (libcuda), or None. Read through the driver
    API, not torch: torch's wheel brings its own CUDA runtime (13 for torch 2.14 from PyPI) and faiss-gpu-cu12 brings
    CUDA 12; an index process imports faiss only, so it never holds two CUDA runtimes."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), device):
            return None
        if (cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
                or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)):  # ..._MINOR
            return None
        return major.value, minor.value
    except OSError:  # no NVIDIA driver on this machine
        return None


def gpu_resources():
    global _GPU_RES
    import faiss

    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES



def gpu_copy(index):
    """A ``GpuIndexBinaryFlat`` copy of a CPU flat index when :func:`faiss_gpu_usable`, else None."""
    import faiss

    return faiss.GpuIndexBinaryFlat(gpu_resources(), index) if faiss_gpu_usable() else None


def gpu_search(gpu_index, cpu_index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search on the GPU copy, one call at a time; k over :data:`GPU_MAX_K` (or no copy): the CPU index."""
    if gpu_index is not None and k <= GPU_MAX_K:
        with _GPU_LOCK:
            return gpu_index.search(q, k)
    return cpu_index.search(q, k)
