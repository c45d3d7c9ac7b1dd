"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/segment.py --manifest ... --output ...``."""

import sys

from batchseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
