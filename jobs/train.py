"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/train.py --images ... --output ...``."""

import sys

from batchseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
