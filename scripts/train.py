"""`python scripts/train.py ...`: the same as `har-train` (see har_flax/cli/train.py)."""

import sys

from har_flax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
