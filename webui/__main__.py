"""`python -m webui`: same as `har-webui`."""

import sys

from webui.main import main

sys.exit(main())
