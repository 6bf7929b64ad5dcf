"""Process-level runtime helpers: Ray connection, logging, progress bars, device choice."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``rayhash`` namespace, configured once to log INFO to stderr."""
    root = logging.getLogger("rayhash")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("RAYHASH_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name if name.startswith("rayhash") else f"rayhash.{name}")


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect to Ray once: ``address`` / ``$RAY_ADDRESS`` when given (a cluster), else a local instance.

    Inside a Ray job (``ray job submit``) this attaches to the job's cluster automatically.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    log = get_logger("runtime")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        kwargs.setdefault("include_dashboard", False)
        # Ray Train's placement-group cleaner asks the dashboard's state API every second whether the train
        # controller still lives; a local instance runs no dashboard, so each ask would log a warning all run long.
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", "rayhash.runtime.quiet_worker_logs")
        log.info("starting a local Ray instance (pass --address to use a cluster)")
        ray.init(runtime_env=runtime_env, **kwargs)
    _quiet_ray_data()


def quiet_worker_logs() -> None:
    """Ray worker set-up hook of the local instance: silence the one Ray logger that repeats a warning about the
    absent dashboard every second (see :func:`init_ray`); errors still show."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars are noise for our own bars; keep the global one."""
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_operator_progress_bars = False
    except Exception:  # older Ray: nothing to quiet
        pass


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterable[T]:
    """A tqdm progress bar on stderr (disabled when ``RAYHASH_PROGRESS=0``)."""
    from tqdm.auto import tqdm

    disable = os.environ.get("RAYHASH_PROGRESS", "1") == "0"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


def ray_gave_no_gpu() -> bool:
    """True inside a Ray task or actor that was given no GPU. Ray no longer hides a node's GPUs from work that asked
    for none (it leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0), so such work must not pick cuda:0 by itself:
    it would share a GPU that Ray gave to another worker. False in a driver and outside Ray."""
    try:
        import ray
        from ray._private import worker

        return (ray.is_initialized() and worker.global_worker.mode == worker.WORKER_MODE
                and not ray.get_gpu_ids())
    except Exception:  # no Ray, or a Ray without these internals: decide by the devices present
        return False


def torch_device():
    """``torch.device`` CUDA when a GPU is present and this process may use it (see :func:`ray_gave_no_gpu`),
    else CPU: the single place the code path decides."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not ray_gave_no_gpu() else "cpu")


def bf16_supported(device) -> bool:
    """Whether bf16 autocast is fast on ``device``: a CUDA GPU with bf16 (Ampere or newer), or a CPU whose oneDNN
    has native bf16 (AVX512-BF16 / AMX); elsewhere bf16 is emulated or refused, so training stays float32."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def bf16_inference(device) -> bool:
    """Whether inference (encoding, caption embedding) runs under bf16 autocast on ``device``: on CUDA GPUs with
    bf16 only (on the CPU, inference stays float32)."""
    return device.type == "cuda" and bf16_supported(device)


def cluster_has_gpus() -> bool:
    """True when the connected Ray cluster has GPUs now, or can have them: an autoscaling cluster whose GPU groups
    start at zero nodes advertises none until something asks for one, so the autoscaler's maximum resources (its
    cluster config, as Ray Train reads them) count too."""
    return cluster_gpus() > 0


def cluster_gpus() -> float:
    """GPUs the connected cluster has now or, autoscaling, at most (0 when not connected)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(max(ray.cluster_resources().get("GPU", 0), _max_cluster_resources().get("GPU", 0)))


def _max_cluster_resources() -> dict:
    """The most of each resource the autoscaler may add ({} without an autoscaler config)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler, or a Ray without this internal API: decide by what is present
        return {}


def require_cpu_headroom(need: float, what: str, fix: str, address: str | None = None) -> None:
    """``need`` CPUs held by long-lived workers (``what``) must leave one CPU of the Ray cluster for Ray Data's read
    tasks, or the pipeline waits forever: an error on a local instance, a warning when connected to a cluster
    (``address`` / ``$RAY_ADDRESS``: an autoscaler may add nodes)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    if need <= total - 1:
        return
    msg = f"{what} = {need:g} CPUs leaves no CPU for Ray Data reading on this Ray cluster ({total:g} CPUs): {fix}"
    if not (address or os.environ.get("RAY_ADDRESS")):
        raise ValueError(msg)
    get_logger("rayhash").warning("%s; continuing in case the cluster autoscales", msg)

