"""Runs the gRPC model server: `python scripts/serve.py --model DIR` (same as `har-serve`)."""

import sys

from grpc_server.main import main

if __name__ == "__main__":
    sys.exit(main())
