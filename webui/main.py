"""`har-webui`: the web UI on a development server (threaded werkzeug).

Production runs the same app under gunicorn: `gunicorn -c deploy/gunicorn.conf.py
'webui:create_app()'`. Flags here override the `HAR_*` environment variables.
"""

from __future__ import annotations

import argparse
import signal
import sys

from werkzeug.serving import make_server

from webui import create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="har-webui", description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-target", help="host:port of the gRPC server (HAR_GRPC_TARGET)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (0 = any)")
    parser.add_argument("--grpc-token", help="bearer token for the gRPC server (HAR_GRPC_TOKEN)")
    parser.add_argument(
        "--grpc-ca-cert", help="PEM CA of the gRPC server's TLS certificate; turns TLS on"
    )
    parser.add_argument("--max-upload-mb", type=float, help="upload limit (HAR_MAX_UPLOAD_MB)")
    parser.add_argument(
        "--no-rate-limit", action="store_true", help="turn per-client rate limiting off"
    )
    return parser.parse_args(argv)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict = {}
    if args.grpc_target:
        overrides["HAR_GRPC_TARGET"] = args.grpc_target
    if args.grpc_token:
        overrides["HAR_GRPC_TOKEN"] = args.grpc_token
    if args.grpc_ca_cert:
        overrides.update(HAR_GRPC_TLS=True, HAR_GRPC_CA_CERT=args.grpc_ca_cert)
    if args.max_upload_mb is not None:
        overrides["HAR_MAX_UPLOAD_MB"] = args.max_upload_mb
    if args.no_rate_limit:
        overrides["HAR_RATE_LIMIT_ENABLED"] = False
    try:
        app = create_app(overrides)
    except ValueError as e:
        print(f"har-webui: {e}", file=sys.stderr)
        return 2
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as e:
        print(f"har-webui: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    # Scripts and tests wait for this exact line (the port is real even with --port 0).
    print(
        f"har-webui listening on http://{host}:{port}/ "
        f"(model server {app.config['HAR_GRPC_TARGET']})",
        flush=True,
    )
    # systemd and scripts stop us with SIGTERM: leave through the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.extensions["har_client"].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
