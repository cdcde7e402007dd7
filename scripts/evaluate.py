"""`python scripts/evaluate.py ...`: the same as `har-evaluate` (see har_flax/cli/evaluate.py)."""

import sys

from har_flax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
