"""`python -m grpc_server`: the same as `har-serve`."""

import sys

from grpc_server.main import main

sys.exit(main())
