"""Ray job entrypoint: `rayhash data convert`.

    ray job submit --working-dir . -- python jobs/convert.py synthetic --out s3://bucket/ds
    rayhash submit --address http://HEAD:8265 convert synthetic --out s3://bucket/ds
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)

from rayhash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", "convert", *sys.argv[1:]]))
