"""Ray job entrypoint: `rayhash train` (the stage list is rayhash.cli.JOB_STAGES).

    ray job submit --working-dir . -- python jobs/train.py <args of rayhash train>
    rayhash submit --address http://HEAD:8265 train <args>
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)

from rayhash.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(__file__))
