"""Ray job entrypoint: `rayhash index build`.

    ray job submit --working-dir . -- python jobs/index.py --codes s3://bucket/codes --out s3://bucket/index
    rayhash submit --address http://HEAD:8265 index --codes s3://bucket/codes --out s3://bucket/index
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)

from rayhash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["index", "build", *sys.argv[1:]]))
