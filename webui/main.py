"""`har-webui`: the web UI on a development server (threaded werkzeug).

Production runs the same app under gunicorn: `gunicorn -c deploy/gunicorn.conf.py
'webui:create_app()'`. Flags here override the `HAR_*` environment variables.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading

from werkzeug.serving import make_server
from werkzeug.wsgi import ClosingIterator

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
    parser.add_argument("--max-upload-mb", type=float, help="upload limit, MiB (HAR_MAX_UPLOAD_MB)")
    parser.add_argument(
        "--grpc-max-message-mb",
        type=float,
        help="largest request the model server accepts, MiB: its --max-message-bytes "
        "(HAR_GRPC_MAX_MESSAGE_MB)",
    )
    parser.add_argument(
        "--no-rate-limit", action="store_true", help="turn per-client rate limiting off"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="at SIGTERM/Ctrl-C, how long requests in progress may take to finish (seconds)",
    )
    return parser.parse_args(argv)


class InFlight:
    """WSGI middleware that counts requests in progress, so a shutdown can wait for them.

    A request counts from the moment the app is called until its response has been sent (the
    server closes the response iterable), uploads being read included.
    """

    def __init__(self, app):
        self.app = app
        self._count = 0
        self._idle = threading.Condition()

    @property
    def count(self) -> int:
        return self._count

    def _finished(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def __call__(self, environ, start_response):
        with self._idle:
            self._count += 1
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self._finished()
            raise
        return ClosingIterator(body, self._finished)

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no request is in progress; False if some still are after timeout_s."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=timeout_s)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The app logs what only the operator can act on (an unreachable or refusing model server).
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict = {}
    flags: dict[str, str] = {}  # setting -> the flag that gave it, to name in errors
    for key, flag, value in (
        ("HAR_GRPC_TARGET", "--grpc-target", args.grpc_target or None),
        ("HAR_GRPC_TOKEN", "--grpc-token", args.grpc_token or None),
        ("HAR_GRPC_CA_CERT", "--grpc-ca-cert", args.grpc_ca_cert or None),
        ("HAR_MAX_UPLOAD_MB", "--max-upload-mb", args.max_upload_mb),
        ("HAR_GRPC_MAX_MESSAGE_MB", "--grpc-max-message-mb", args.grpc_max_message_mb),
    ):
        if value is not None:
            overrides[key], flags[key] = value, flag
    if args.grpc_ca_cert:
        overrides["HAR_GRPC_TLS"] = True
    if args.no_rate_limit:
        overrides["HAR_RATE_LIMIT_ENABLED"] = False
    try:
        app = create_app(overrides)
    except ValueError as e:
        message = str(e)
        for key, flag in flags.items():  # "HAR_MAX_UPLOAD_MB=20" was "--max-upload-mb 20"
            message = re.sub(rf"\b{key}=", f"{flag} ", message)
            message = re.sub(rf"\b{key}\b", flag, message)
        print(f"har-webui: {message}", file=sys.stderr)
        return 2
    in_flight = InFlight(app.wsgi_app)
    app.wsgi_app = in_flight
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
    # Stop accepting (new connections are refused), then let the requests in progress finish:
    # their threads are daemons, so returning would cut an upload off mid-way. A second SIGTERM
    # changes nothing (`make serve` passes one on after the terminal's Ctrl-C); a second Ctrl-C
    # stops waiting.
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.server_close()
        if in_flight.count:
            print(
                f"har-webui: stopping; waiting up to {args.grace:g} s for "
                f"{in_flight.count} request(s) in progress",
                file=sys.stderr,
                flush=True,
            )
        if not in_flight.wait_idle(args.grace):
            print(
                f"har-webui: {in_flight.count} request(s) still in progress after "
                f"{args.grace:g} s; stopping anyway",
                file=sys.stderr,
                flush=True,
            )
    except KeyboardInterrupt:  # a second Ctrl-C: do not wait any longer
        return 1
    finally:
        app.extensions["har_client"].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
