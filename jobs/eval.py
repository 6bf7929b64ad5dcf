"""Ray job entrypoint: `rayhash eval`.

    ray job submit --working-dir . -- python jobs/eval.py --index s3://bucket/index --checkpoint s3://bucket/run --queries s3://bucket/ds/test --out s3://bucket/eval
    rayhash submit --address http://HEAD:8265 eval --index s3://bucket/index --checkpoint s3://bucket/run --queries s3://bucket/ds/test --out s3://bucket/eval
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)

from rayhash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
