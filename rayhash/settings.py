"""Every environment variable rayhash reads or forwards, listed once: name, default, meaning, forwarded to jobs.

Code reads a variable through its :class:`Setting` (``settings.LEASE_TTL.number()``), never through ``os.environ``;
``rayhash submit`` forwards exactly the settings marked ``forwarded`` (:func:`forwarded`), and the README's table
is :func:`markdown_table` (a test keeps them equal). Secrets (tokens) are never forwarded: a job's environment is
visible through the Jobs API.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One environment variable. ``default``: the value when unset (None: unset means off / not given);
    ``forwarded``: copied into jobs that ``rayhash submit`` starts when set in the submitter's shell; ``owner``:
    ``rayhash`` for ours, else the library that reads it (rayhash only forwards those)."""

    name: str
    default: str | None
    meaning: str
    forwarded: bool
    owner: str = "rayhash"

    def get(self) -> str | None:
        """The value, or the default when unset or empty."""
        return os.environ.get(self.name) or self.default

    def number(self) -> float:
        """The value as a number; an error names the variable and the fix."""
        value = self.get()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"${self.name}={value!r} is not a number ({self.meaning}); unset it or give a number "
                             f"such as {self.default}") from None

    def is_set(self) -> bool:
        return bool(os.environ.get(self.name))


def _s(name: str, default: str | None, meaning: str, forwarded: bool, owner: str = "rayhash") -> Setting:
    s = Setting(name, default, meaning, forwarded, owner)
    ALL.append(s)
    return s


ALL: list[Setting] = []
ADDRESS = _s("RAYHASH_ADDRESS", None, "Ray cluster (dashboard http://HOST:8265 for `submit`, or ray://) to run on "
             "instead of a private local instance", False)
RAY_ADDRESS = _s("RAY_ADDRESS", None, "set by Ray inside a job: the job's own cluster (rayhash attaches to it)",
                 False, owner="ray")
TOKEN = _s("RAYHASH_TOKEN", None, "secret: the cluster's / the service's bearer token", False)
TOKEN_FILE = _s("RAYHASH_TOKEN_FILE", None, "file holding that token (preferred to RAYHASH_TOKEN)", False)
RAY_TOKEN = _s("RAY_AUTH_TOKEN", None, "secret: Ray's own token variable, read when RAYHASH_TOKEN is unset", False,
               owner="ray")
RAY_TOKEN_FILE = _s("RAY_AUTH_TOKEN_PATH", None, "Ray's own token-file variable, read when RAYHASH_TOKEN_FILE is "
                    "unset", False, owner="ray")
LOCAL_TOKEN = _s("RAYHASH_LOCAL_TOKEN", None, "secret: turns on token authentication for the loopback cluster "
                 "`cluster/local.sh` starts", False, owner="cluster/local.sh")
LOG_LEVEL = _s("RAYHASH_LOG_LEVEL", "INFO", "level of rayhash's log lines (DEBUG, INFO, WARNING)", True)
PROGRESS = _s("RAYHASH_PROGRESS", "1", "0 turns progress bars off", True)
DEBUG = _s("RAYHASH_DEBUG", None, "1: a failing command prints the full traceback", True)
LEASE_TTL = _s("RAYHASH_LEASE_TTL", "120", "seconds after which another host may take over a dead writer's "
               "output-folder lease", True)
MAX_IMAGE_PIXELS = _s("RAYHASH_MAX_IMAGE_PIXELS", "64000000", "larger images are refused before decoding "
                      "(decompression bombs)", True)
ACTOR_START_TIMEOUT = _s("RAYHASH_ACTOR_START_TIMEOUT", "900", "seconds an index's shard-group actors may take to "
                         "start and load", True)
FAISS_GPU = _s("RAYHASH_FAISS_GPU", None, "force: use a faiss GPU wheel even on a GPU its kernels do not list",
               True)
NLTK_DATA = _s("NLTK_DATA", None, "folders holding nltk's WordNet corpus", True, owner="nltk")
HF_HUB_OFFLINE = _s("HF_HUB_OFFLINE", None, "1: never reach the Hugging Face hub", True, owner="huggingface")
HF_HOME = _s("HF_HOME", None, "Hugging Face cache folder", True, owner="huggingface")
TOKENIZERS_PARALLELISM = _s("TOKENIZERS_PARALLELISM", None, "false: quiet the tokenizers fork warning", True,
                            owner="huggingface")
RAY_AUTH_MODE = _s("RAY_AUTH_MODE", None, "Ray's token authentication; a private local instance sets `disabled` "
                   "unless it is set (rayhash.runtime)", False, owner="ray")
PREEMPTION_WATCHER = _s("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None, "Ray Train's watcher for nodes being drained; "
                        "a private local instance sets `0` unless it is set (rayhash.runtime)", False, owner="ray")
RAY_TRAIN_V2 = _s("RAY_TRAIN_V2_ENABLED", None, "1: Ray Train's v2 controller (what rayhash is tested with)", True,
                  owner="ray")


def forwarded() -> tuple[str, ...]:
    """Names copied into submitted jobs when set in the submitter's shell (never a secret)."""
    return tuple(s.name for s in ALL if s.forwarded)


def markdown_table() -> str:
    """The README's table of environment variables."""
    rows = ["| variable | default | meaning | forwarded to jobs |", "|---|---|---|---|"]
    for s in ALL:
        who = "" if s.owner == "rayhash" else f" (read by {s.owner})"
        rows.append(f"| `{s.name}` | {s.default or ''} | {s.meaning}{who} | {'yes' if s.forwarded else 'no'} |")
    return "\n".join(rows)
