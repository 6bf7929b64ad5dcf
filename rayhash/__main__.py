"""``python -m rayhash ...`` = the ``rayhash`` command (what a Ray job's entrypoint can call without the script)."""
import sys

from rayhash.cli import main

if __name__ == "__main__":
    sys.exit(main())
