"""``python scripts/explore.py ARGS`` is ``har-explore ARGS``: see har_flax/cli/explore.py."""

import sys

from har_flax.cli.explore import main

if __name__ == "__main__":
    sys.exit(main())
