"""Ray job entrypoint: `rayhash pipeline`.

    ray job submit --working-dir . -- python jobs/pipeline.py --dataset synthetic --out s3://bucket/pipeline
    rayhash submit --address http://HEAD:8265 pipeline --dataset synthetic --out s3://bucket/pipeline
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)

from rayhash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
