"""``python scripts/predict.py ARGS`` is ``har-predict ARGS``: see har_flax/cli/predict.py.

With no image it classifies the bundled sample photo (what ``make serve`` shows until the server
exists).
"""

import sys

from har_flax.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
