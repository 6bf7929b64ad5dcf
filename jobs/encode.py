"""Ray job entrypoint: `rayhash encode`.

    ray job submit --working-dir . -- python jobs/encode.py --checkpoint s3://bucket/run --data s3://bucket/ds/test --out s3://bucket/codes
    rayhash submit --address http://HEAD:8265 encode --checkpoint s3://bucket/run --data s3://bucket/ds/test --out s3://bucket/codes
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)

from rayhash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
