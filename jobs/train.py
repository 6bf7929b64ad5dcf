"""Ray job entrypoint: `rayhash train`.

    ray job submit --working-dir . -- python jobs/train.py --config configs/X.yaml --data s3://bucket/ds --out s3://bucket/run
    rayhash submit --address http://HEAD:8265 train --config configs/X.yaml --data s3://bucket/ds --out s3://bucket/run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)

from rayhash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
