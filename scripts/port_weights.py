"""``python scripts/port_weights.py ARGS`` is ``har-port-weights ARGS``: see har_flax/cli."""

import sys

from har_flax.cli.port_weights import main

if __name__ == "__main__":
    sys.exit(main())
