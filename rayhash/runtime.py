"""Process-level runtime helpers: Ray connection, logging, progress bars, device choice."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

from rayhash import settings

T = TypeVar("T")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``rayhash`` namespace, configured once to log INFO to stderr."""
    root = logging.getLogger("rayhash")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(settings.LOG_LEVEL.get())
        root.propagate = False
    return logging.getLogger(name if name.startswith("rayhash") else f"rayhash.{name}")


def ray_address(address: str | None = None) -> str | None:
    """The Ray cluster a command runs on: ``address`` (``--address``), else ``$RAYHASH_ADDRESS``, else
    ``$RAY_ADDRESS`` (which Ray sets inside ``ray job submit``); None: a private local instance.

    An ``http(s)://`` Jobs API URL in ``$RAYHASH_ADDRESS`` is the address of ``rayhash submit`` and is skipped here;
    as ``--address`` it is refused, naming what to pass instead."""
    if address and address.startswith(("http://", "https://")):
        raise ValueError(f"--address {address}: a Jobs API URL is for `rayhash submit`; a command run here takes a "
                         "Ray cluster address (HOST:6379, ray://HOST:10001 or auto), or none for a private local "
                         "Ray instance")
    env = settings.ADDRESS.get()
    if env and env.startswith(("http://", "https://")):
        env = None
    return address or env or settings.RAY_ADDRESS.get() or None


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect to Ray once: the cluster :func:`ray_address` names, else a private local instance.

    *Local means local*: without an address this process starts its own Ray instance (``address="local"``) in its
    own temporary folder, removed at exit (kept when ``$RAYHASH_DEBUG`` is set), and never joins another instance
    running on this machine, whoever started it. Inside a Ray job (``ray job submit``) ``$RAY_ADDRESS`` attaches it
    to the job's cluster. ``address="local"``: the private instance whatever the environment names (benchmarks)."""
    import ray

    if ray.is_initialized():
        return
    address = None if address == "local" else ray_address(address)
    log = get_logger("runtime")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        _start_private_instance(log, **kwargs)
    quiet_ray_data()


def _start_private_instance(log: logging.Logger, **kwargs) -> None:
    import atexit
    import tempfile

    import ray

    # Ray >= 2.52 turns on token authentication for every instance ray.init() starts and writes the token to
    # ~/.ray/auth_token, a file shared with the user's other Ray instances and clusters (and it warns about it on
    # every command). This instance accepts connections from this process's own workers only, and its folder is
    # private, so it runs without a token: RAY_AUTH_MODE=disabled (Ray's documented opt-out), for this process and
    # the Ray processes it starts. An explicit RAY_AUTH_MODE is kept.
    os.environ.setdefault(settings.RAY_AUTH_MODE.name, "disabled")
    # Ray Train's PreemptionWatcher actor watches for nodes being drained; a single-machine private instance has
    # none to drain, and creating it (it takes actor handles as constructor arguments) makes Ray's C++ core worker
    # print a "constructor arguments in the object store" error line (ray-project/ray#53727) on every train run.
    os.environ.setdefault(settings.PREEMPTION_WATCHER.name, "0")
    kwargs.setdefault("include_dashboard", False)
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", "rayhash.runtime.quiet_worker_logs")
    log.info("starting a private local Ray instance (pass --address or set RAYHASH_ADDRESS to use a cluster)")
    for attempt in (1, 2):
        # Short and private: Ray's Unix sockets live under it (paths are limited to ~107 bytes), and no other process
        # finds this instance through it (Ray's auto-detection reads /tmp/ray).
        temp = tempfile.mkdtemp(prefix="rayhash-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        atexit.register(_remove_private_instance, temp)
        try:
            ray.init(address="local", _temp_dir=temp, runtime_env=runtime_env, **kwargs)
            return
        except Exception as e:
            # Ray gives a new node 30 s to register with its GCS (hard-coded in ray/_private/node.py); a loaded
            # machine can miss that. Its processes are still starting: stop them, then start once more.
            if attempt == 2 or _NODE_START_TIMEOUT not in str(e):
                raise
            log.warning("the local Ray instance did not register within Ray's 30 s limit (a loaded machine?); "
                        "starting it once more")
            ray.shutdown()
            _stop_processes_under(temp)


_NODE_START_TIMEOUT = "timed out during startup"  # Ray's message when its node misses the registration limit


def _stop_processes_under(folder: str) -> list[int]:
    """SIGKILL this user's processes whose command line names ``folder`` (the Ray processes a private instance
    started under its temporary folder: GCS, raylet, log monitor, workers); returns their pids. Linux (``/proc``)
    only; elsewhere it finds none."""
    import signal

    killed, inside = [], os.path.join(folder, "")  # paths below it, never a longer sibling's
    for pid in (int(p) for p in (os.listdir("/proc") if os.path.isdir("/proc") else []) if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if pid != os.getpid() and inside in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def _remove_private_instance(temp: str) -> None:
    """At exit: stop the private instance, then delete its folder (logs and spilled objects) unless debugging."""
    import shutil

    import ray

    ray.shutdown()
    if not settings.DEBUG.is_set():
        shutil.rmtree(temp, ignore_errors=True)


def quiet_worker_logs() -> None:
    """Ray worker set-up hook of the private local instance (see :func:`init_ray`).

    - ``$RAY_ADDRESS`` = this instance: Ray's own code in workers (Ray Train's placement-group cleaner asks the
      state API every second whether the train controller lives) otherwise looks for "the" local instance and, with
      another one running on the machine, dies with a ``Found multiple active Ray instances`` traceback.
    - The cleaner's logger is silenced below ERROR: a local instance runs no dashboard, so each ask would log a
      warning all run long; errors still show. So is the train controller's autoscaling-request client: on a
      loaded machine its one-second request to the (local, fixed-size) instance's autoscaler times out and logs a
      20-line ``GetTimeoutError`` traceback that Ray itself calls "safe to ignore".
    - Ray Data's own ``exclude_resources`` deprecation warning (raised inside Ray Train's dataset manager, not by
      rayhash) is dropped, and its per-dataset INFO lines in the train workers and split coordinator are quieted
      as in the driver (:func:`quiet_ray_data`)."""
    import warnings

    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    for name in _LOCAL_ONLY_NOISE:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        # and a filter: Ray Train's controller later runs logging.config.dictConfig for "ray.train", which resets
        # the level of every existing logger below it to NOTSET but leaves their filters
        logger.addFilter(_ERRORS_ONLY)
    warnings.filterwarnings("ignore", message=r".*exclude_resources.* is deprecated")
    quiet_ray_data()


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_ERRORS_ONLY = _ErrorsOnly()
# Ray Train loggers that only complain about a local instance having no dashboard and no autoscaler
_LOCAL_ONLY_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                     "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client")


def quiet_ray_data() -> None:
    """Ray Data's progress output (per-operator bars, and off a terminal a ``Total Progress: 0/?`` log block per
    dataset) and its per-dataset INFO lines (execution plan, log folder, "execution finished": one set per epoch in a
    train worker) are noise beside rayhash's own bars and epoch lines, which count the samples each stage knows it
    will read; its warnings and errors still show. Run in the driver, in every worker of a private instance, and
    at the start of each train worker (on any cluster)."""
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_operator_progress_bars = False
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    except Exception:  # older Ray: nothing to quiet
        pass


def progress(iterable: Iterable[T] | None, total: int | None = None, desc: str = "",
             unit: str = "it") -> Iterable[T]:
    """A tqdm progress bar on stderr (disabled when ``RAYHASH_PROGRESS=0``); ``iterable=None``: a bar moved by
    ``.update(n)``."""
    from tqdm.auto import tqdm

    disable = settings.PROGRESS.get() == "0"
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
    (:func:`ray_address`: an autoscaler may add nodes)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    if need <= total - 1:
        return
    msg = f"{what} = {need:g} CPUs leaves no CPU for Ray Data reading on this Ray cluster ({total:g} CPUs): {fix}"
    if not ray_address(address):
        raise ValueError(msg)
    get_logger("rayhash").warning("%s; continuing in case the cluster autoscales", msg)

