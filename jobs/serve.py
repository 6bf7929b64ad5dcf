"""Ray job entrypoint: `rayhash serve` (runs until the job is stopped: `rayhash stop JOB_ID`).

    ray job submit --working-dir . -- python jobs/serve.py --index s3://bucket/index --replicas 4
    rayhash submit --address http://HEAD:8265 serve --index s3://bucket/index --data s3://bucket/ds/train
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)

from rayhash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
