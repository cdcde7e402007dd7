"""Real processes for the web UI tests: gRPC model servers, the web UI under a real WSGI server.

Not a test module itself (it holds no tests); the web UI, browser and stack tests import it so
that one server of each kind is started once per pytest session and shared, whichever of those
modules runs first. Everything here runs for real: `python -m grpc_server.main` subprocesses on
port 0, a tiny action model written with har_flax.checkpoint, werkzeug/gunicorn/nginx.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

#: Class names of the tiny action model: markup and an ampersand, so a page that inserted them
#: as HTML (instead of text) would show a bold word or an image, and the tests would notice.
TINY_CLASSES = ("<b>jumping</b>", "running & walking", '<img src=x alt="sitting">')
TINY_TOKEN = "webui-test-token"
#: The tiny server refuses frames above this many pixels (RESOURCE_EXHAUSTED → HTTP 413).
TINY_MAX_PIXELS = 300_000

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


class GrpcServer:
    """One `python -m grpc_server.main` subprocess on a free port, logging to a file.

    Args:
      name: a label for messages and the log file name.
      args: extra har-serve flags (--model, --auth-token, ...).
      log_dir: where the server's stdout/stderr go (read to find the bound ports).
    """

    def __init__(self, name: str, args: Sequence[str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"grpc-{name}.log"
        self._log = self.log_path.open("wb")
        cmd = [PYTHON, "-m", "grpc_server.main", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--metrics-port", "0", "--metrics-host", "127.0.0.1", "--grace", "1"]
        cmd += ["--drain", "0", *args]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.port: int | None = None
        self.metrics_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _fail(self, what: str) -> None:
        tail = "\n".join(self.log_text().splitlines()[-30:])
        pytest.fail(f"gRPC server {self.name!r}: {what}; log tail:\n{tail}")

    def wait_listening(self, timeout_s: float = 120) -> None:
        """Waits for the "listening on HOST:PORT" and metrics lines; fills port/metrics_port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_text()
            listening, metrics = _LISTENING.search(text), _METRICS.search(text)
            if listening and metrics:
                self.port, self.metrics_port = int(listening.group(2)), int(metrics.group(2))
                return
            if self.proc.poll() is not None:
                self._fail(f"exited with {self.proc.returncode} before listening")
            time.sleep(0.2)
        self._fail(f"not listening after {timeout_s} s")

    def wait_serving(self, timeout_s: float = 300) -> None:
        """Waits until the har.v1 Health RPC says SERVING (model loaded and warmed up)."""
        if self.port is None:
            self.wait_listening()
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = har_pb2_grpc.ActionRecognitionStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self._fail(f"exited with {self.proc.returncode} while loading")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Health(har_pb2.HealthRequest(), timeout=5)
                    if reply.status == har_pb2.HealthResponse.SERVING:
                        return
                time.sleep(0.5)
        self._fail(f"not SERVING after {timeout_s} s")

    def stop(self) -> None:
        """SIGTERM (the server's clean shutdown), then SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# One of each server per session, shared by every module that asks (see the module docstring).
_servers: dict[str, GrpcServer] = {}
_lock = threading.Lock()


def shared_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "webui-shared"


def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random action model (K=3, 32x32) with TINY_CLASSES, written once per session."""
    path = shared_dir(tmp_path_factory) / "tiny-model"
    if not (path / "labels.json").exists():
        import jax

        from har_flax import checkpoint, config, models

        # Served as a default model is (see grpc_support.tiny_model_dir).
        cfg = config.override(config.tiny(), {"model.depthwise_impl": "auto"})
        variables = models.init_variables(cfg.model, jax.random.key(0))
        checkpoint.save_model(
            path, config=cfg, classes=list(TINY_CLASSES), variables=variables, kind="action"
        )
    return path


def shared_server(name: str, args: Sequence[str], request, *, serving: bool = True) -> GrpcServer:
    """Starts (once per session) and returns the named server; stops it at session end.

    `request` must be a session-scoped fixture's: its finalizer stops the server.
    """
    assert request.scope == "session", "shared servers live as long as the session"
    with _lock:
        server = _servers.get(name)
        if server is None:
            log_dir = shared_dir(request.getfixturevalue("tmp_path_factory"))
            log_dir.mkdir(parents=True, exist_ok=True)
            server = _servers[name] = GrpcServer(name, args, log_dir)
            request.addfinalizer(server.stop)
    if serving:
        server.wait_serving()
    else:
        server.wait_listening()
    return server


def tiny_server(request) -> GrpcServer:
    """The tiny action model behind a bearer token, with a small pixel limit."""
    model = tiny_model_dir(request.getfixturevalue("tmp_path_factory"))
    args = ["--model", str(model), "--auth-token", TINY_TOKEN]
    args += ["--max-pixels", str(TINY_MAX_PIXELS), "--max-batch-size", "2"]
    return shared_server("tiny", args, request)


def default_server(request) -> GrpcServer:
    """The built-in default model (ImageNet MobileNetV2 at 224x224), no auth."""
    return shared_server("default", ["--max-batch-size", "2"], request)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WsgiServer:
    """The web UI app on a real threaded werkzeug server in this process, on a free port."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def wait_http(
    url: str,
    timeout_s: float = 60,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Waits until `url` answers 200 (fails early, with `log`'s tail, if `proc` exits)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log else ""
            pytest.fail(f"{proc.args} exited with {proc.returncode} before {url} answered\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = e
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer 200 within {timeout_s} s (last: {last})")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
    """Stops a subprocess started by a test (its own id only) and returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def env_without_proxies() -> dict[str, str]:
    """os.environ minus proxy settings, so clients talk to 127.0.0.1 directly."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


class TcpForwarder:
    """A real TCP front for a model server at a fixed port, to take it down and bring it back.

    The web UI is pointed at `target` (127.0.0.1 and a free port) for its whole life, as it
    would be at a load balancer's address, while the test switches what is behind it:
    - `close()`: nothing listens (connections are refused), as when the server is down;
    - `reject()`: connections are accepted and closed at once, as by a load balancer with no
      live backend; each one is recorded in `accepted` (monotonic times), so a test can see
      when the web UI's channel tries to reconnect;
    - `forward(backend)`: every connection is relayed byte for byte to `backend` (host:port).
    """

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.accepted: list[float] = []
        self._backend: tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []

    def reject(self) -> None:
        self._backend = None
        self._listen()

    def forward(self, backend: str) -> None:
        host, port = backend.rsplit(":", 1)
        self._backend = (host, int(port))
        self._listen()

    def _listen(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True)
        self._thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            backend = self._backend
            if backend is None:
                self.accepted.append(time.monotonic())
                conn.close()
                continue
            try:
                upstream = socket.create_connection(backend, timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stops listening and cuts every relayed connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            self._thread.join(timeout=5)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class ConnectProxy:
    """A real HTTP CONNECT proxy on a free port: every tunnel goes to `backend` (host:port),
    whatever it asks for; `asked` records each CONNECT's target, to see who went through."""

    def __init__(self, backend: str):
        host, port = backend.rsplit(":", 1)
        self._backend = (host, int(port))
        self.asked: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            head += chunk
        request_line = head.split(b"\r\n", 1)[0].decode()
        method, target = request_line.split()[:2]
        if method != "CONNECT":
            conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            return
        self.asked.append(target)
        upstream = socket.create_connection(self._backend, timeout=5)
        upstream.settimeout(None)
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            upstream.sendall(rest)
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=TcpForwarder._pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._listener.close()


#: A proxy address where nothing listens: whatever is sent through it fails.
DEAD_PROXY = "http://127.0.0.1:9"


def proxy_env(proxy: str) -> dict[str, str]:
    """Every proxy variable set to `proxy`, none of the no_proxy ones (no exception for
    loopback): what a shell behind a corporate proxy may have."""
    names = ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY")
    return {**env_without_proxies(), **dict.fromkeys(names, proxy)}


class BareGrpcServer(har_pb2_grpc.ActionRecognitionServicer):
    """A minimal har.v1 server in this process, without grpc_server's error details.

    It stands for a server written another way (another language, an older release): its
    limits are gRPC core's own, answered with bare statuses that carry no google.rpc details,
    such as "Concurrent RPC limit exceeded!" (`max_concurrent_rpcs`). Predict holds each call
    until `release` is set, so a test can fill the server up deterministically.
    """

    def __init__(self, *, max_concurrent_rpcs: int | None = None):
        from concurrent import futures

        self.release = threading.Event()
        self.predicting = threading.Event()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), maximum_concurrent_rpcs=max_concurrent_rpcs
        )
        har_pb2_grpc.add_ActionRecognitionServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self._server.start()

    def Health(self, request, context):
        return har_pb2.HealthResponse(status=har_pb2.HealthResponse.SERVING)

    def Predict(self, request, context):
        self.predicting.set()
        self.release.wait(30)
        return har_pb2.PredictResponse(action="waiting", confidence=1.0)

    def stop(self) -> None:
        self.release.set()
        self._server.stop(grace=None).wait(10)
