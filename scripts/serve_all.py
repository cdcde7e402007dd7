"""`make serve`: the gRPC model server and the web UI together, for one person on one machine.

    python scripts/serve_all.py [--model DIR] [--port 8080] [--grpc-port 50051]

Starts `python -m grpc_server.main` (the built-in ImageNet model unless --model), waits until
its standard gRPC health check says SERVING, starts the web UI (`python -m webui.main`)
against it, waits until /health answers, prints the URL, and on Ctrl-C (or SIGTERM, or the
terminal closing: SIGHUP) stops the web UI, then the model server, each cleanly. If either exits
on its own, the other is stopped too and the exit code is 1; if this script is killed, both
get SIGTERM (Linux). Loopback traffic never goes through http_proxy/grpc_proxy.
Production runs the same two processes under systemd with gunicorn and nginx (deploy/).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_GRPC_LISTENING = re.compile(r"listening on \S+:(\d+)")
_WEB_LISTENING = re.compile(r"listening on (http://\S+)")


def _die_with_parent():
    """On Linux, a preexec_fn that has the child sent SIGTERM when this script dies.

    Even a SIGKILL of this script then stops both servers, which would otherwise hold their
    ports (the next `make serve` would fail with "address in use"). Elsewhere None.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    # Looked up here, not in the child: between fork and exec only the call itself runs.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return preexec


class Child:
    """A subprocess whose output is echoed with a prefix and searched for a pattern."""

    def __init__(self, name: str, cmd: list[str], pattern: re.Pattern):
        self.name = name
        self.pattern = pattern
        self.match: re.Match | None = None
        self.found = threading.Event()
        # Its own session: Ctrl-C reaches only this script, which stops the children in order.
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                sys.stdout.write(f"[{self.name}] {line}")
                sys.stdout.flush()
            except OSError:
                pass  # the terminal is gone (SIGHUP): keep reading, or the child would block
            if self.match is None:
                match = self.pattern.search(line)
                if match:
                    self.match = match
                    self.found.set()

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                print(f"serve_all: {self.name} did not stop in {timeout_s:g} s; killing it")
                self.proc.kill()
                self.proc.wait()


class Stop(Exception):
    """Raised in the main thread by SIGINT, SIGTERM or SIGHUP (the terminal was closed)."""


#: Each stops both servers cleanly: Ctrl-C, `kill`/systemd, and closing the terminal.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum, frame):
    raise Stop


def _wait_for(child: Child, what: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while not child.found.wait(0.2):
        if not child.running():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: no {what} within {timeout_s:g} s")
    return child.match


def _wait_serving(target: str, server: Child, timeout_s: float) -> None:
    """Waits for the standard grpc.health.v1 check to say SERVING (model loaded, compiled)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    print("serve_all: waiting for the model to load and compile (a minute or so on a CPU)")
    deadline = time.monotonic() + timeout_s
    # Loopback never goes through a proxy (http_proxy/grpc_proxy without no_proxy for it).
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not server.running():
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"the model server was not SERVING within {timeout_s:g} s")


def _wait_healthy(url: str, web: Child, timeout_s: float = 60) -> None:
    """Waits for the web UI's /health to answer 200 (it asks the model server)."""
    deadline = time.monotonic() + timeout_s
    # No proxy from the environment: it could not reach this machine's loopback address.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if not web.running():
            raise RuntimeError(f"{web.name} exited with {web.proc.returncode}")
        try:
            with opener.open(url + "health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}health did not answer 200 within {timeout_s:g} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: built-in ImageNet model)")
    parser.add_argument("--host", default="127.0.0.1", help="web UI address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="web UI port, 0 = any free one")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port, 0 = any free one")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=4,
        help="largest batch the model server compiles; small = a quick start for one person "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for the model to load"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    grpc_cmd = [sys.executable, "-m", "grpc_server.main", "--host", "127.0.0.1"]
    grpc_cmd += ["--port", str(args.grpc_port), "--max-batch-size", str(args.max_batch_size)]
    if args.model:
        # The servers run from the repository; the path is the caller's, from where they are.
        grpc_cmd += ["--model", os.path.abspath(args.model)]
    children: list[Child] = []
    code = 0
    try:
        grpc = Child("grpc", grpc_cmd, _GRPC_LISTENING)
        children.append(grpc)
        target = f"127.0.0.1:{_wait_for(grpc, 'listening line', 120).group(1)}"
        _wait_serving(target, grpc, args.timeout)
        web_cmd = [sys.executable, "-m", "webui.main", "--grpc-target", target]
        web_cmd += ["--host", args.host, "--port", str(args.port)]
        web = Child("webui", web_cmd, _WEB_LISTENING)
        children.append(web)
        url = _wait_for(web, "listening line", 60).group(1)
        _wait_healthy(url, web)
        print(f"\nhar-flax is ready: open {url} in a browser (Ctrl-C stops it)\n", flush=True)
        while grpc.running() and web.running():
            time.sleep(0.5)
        stopped = grpc if not grpc.running() else web
        print(f"serve_all: {stopped.name} exited with {stopped.proc.returncode}; stopping")
        code = 1
    except Stop:
        print("\nserve_all: stopping", flush=True)
    except RuntimeError as e:
        print(f"serve_all: {e}", file=sys.stderr)
        code = 1
    finally:
        # Ignore a second Ctrl-C while shutting down, so the children are always stopped.
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        for child in reversed(children):  # the web UI first: it depends on the model server
            child.stop()
    print("serve_all: stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
