"""Runs the web UI's development server: `python scripts/serve_webui.py --grpc-target HOST:PORT`
(same as `har-webui`; production runs `gunicorn -c deploy/gunicorn.conf.py`). Not named
webui.py: scripts/ comes first on sys.path, so that name would hide the webui package."""

import sys

from webui.main import main

if __name__ == "__main__":
    sys.exit(main())
