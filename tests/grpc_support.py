"""Helpers shared by the tests/test_grpc_*.py modules (not a test module itself).

Everything is real: `python -m grpc_server.main` subprocesses on port 0, a tiny random action
model written with har_flax.checkpoint.save_model, real grpcio clients, and the google.rpc
details as a client in any language would read them.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TINY_CLASSES = ("clapping", "dancing", "running")
LISTENING = re.compile(r"listening on (\S+):(\d+)")
METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _self_signed_ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=har-test-{name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)  # fmt: skip


def make_test_certs(directory: Path, *, extra_cas: Sequence[str] = ()) -> Path:
    """Writes test certificates with the openssl CLI into `directory` and returns it.

    ca.pem signs server.pem (SAN localhost, 127.0.0.1) and client.pem (clientAuth), each with
    its .key; every name in `extra_cas` is one more self-signed CA (NAME.pem, NAME.key) that
    signs nothing, for "wrong CA" cases.
    """
    _self_signed_ca("ca", directory)
    for name in extra_cas:
        _self_signed_ca(name, directory)
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip
    return directory


def tiny_model_dir(base: Path) -> Path:
    """A tiny random action model (32x32, 3 classes) under `base`, created once per `base`.

    The logits layer is scaled up so that different photos get visibly different probabilities
    (a freshly initialised head gives nearly the same near-uniform answer for everything).
    """
    path = base / "tiny-action-model-v2"
    if (path / "labels.json").exists():
        return path
    import jax

    from har_flax.checkpoint import save_model
    from har_flax.config import override, tiny
    from har_flax.models import init_variables

    # Served as a default model is ("auto": "shift" here), whose answer to an image does not
    # depend on the batch it is computed in; tiny's XLA convolutions differ in the last bits.
    config = override(tiny(), {"model.depthwise_impl": "auto"})
    variables = jax.tree.map(np.asarray, init_variables(config.model, jax.random.key(7)))
    logits = variables["params"]["logits"]
    # Random features reach the logits layer at ~1e-5; this brings the logits to order 1.
    logits["kernel"] = logits["kernel"] * 1e5
    save_model(path, config=config, classes=TINY_CLASSES, variables=variables)
    return path


def shared_tmp(tmp_path_factory) -> Path:
    """The session's base temp dir, shared by every module (so the tiny model is made once)."""
    return tmp_path_factory.getbasetemp()


def jpeg(array: np.ndarray, size: int | None = None, quality: int = 90, **save_kw) -> bytes:
    """Encodes an RGB uint8 array as JPEG, optionally resized to size x size first."""
    from PIL import Image

    im = Image.fromarray(array)
    if size:
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, **save_kw)
    return buf.getvalue()


def stub(target: str, credentials=None, **options) -> har_pb2_grpc.ActionRecognitionStub:
    opts = [("grpc.max_send_message_length", 64 << 20), *options.items()]
    if credentials is None:
        channel = grpc.insecure_channel(target, options=opts)
    else:
        channel = grpc.secure_channel(target, credentials, options=opts)
    return har_pb2_grpc.ActionRecognitionStub(channel)


def rich_details(err: grpc.RpcError) -> dict:
    """The google.rpc.Status details of a failed call: reason, violations, retry delay."""
    out = {"reason": None, "violations": [], "retry_s": None}
    status = rpc_status.from_call(err)
    if status is None:
        return out
    for detail in status.details:
        for cls, key in (
            (error_details_pb2.ErrorInfo, "reason"),
            (error_details_pb2.BadRequest, "violations"),
            (error_details_pb2.RetryInfo, "retry_s"),
        ):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                if key == "reason":
                    out[key] = msg.reason
                elif key == "violations":
                    out[key] = [(v.field, v.description) for v in msg.field_violations]
                else:
                    out[key] = msg.retry_delay.ToNanoseconds() / 1e9
    return out


def probabilities(reply: har_pb2.PredictResponse) -> dict[str, float]:
    return {p.action: p.confidence for p in reply.all_predictions}


class ServerProcess:
    """`python -m grpc_server.main ARGS` on port 0, its stderr collected line by line.

    Args:
      args: har-serve flags (port, metrics and host flags are added here).
      env: extra environment variables.
    """

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None):
        cmd = [sys.executable, "-m", "grpc_server.main", "--host", "127.0.0.1", "--port", "0"]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.lines: list[str] = []
        self._changed = threading.Condition()
        # stderr goes to a file as well, so a failing test can show the whole log.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="har-serve-", suffix=".log")
        self.proc = subprocess.Popen(
            [*cmd, *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port: int | None = None
        self.metrics_port: int | None = None

    def _read(self):
        for line in self.proc.stderr:
            self.log.write(line)
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str | re.Pattern, timeout: float = 120) -> re.Match:
        """Waits for a stderr line matching `pattern`; fails with the log if the server exits."""
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"server exited ({self.proc.returncode}) before {regex.pattern!r}:\n"
                        + "\n".join(self.lines[-40:])
                    )
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no {regex.pattern!r} after {timeout} s:\n" + "\n".join(self.lines[-40:])
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait_listening(self, timeout: float = 120) -> int:
        self.port = int(self.wait_for_line(LISTENING, timeout).group(2))
        if "--metrics-port" in self.proc.args:
            self.metrics_port = int(self.wait_for_line(METRICS, timeout).group(2))
        return self.port

    def wait_serving(self, timeout: float = 300) -> None:
        if self.port is None:
            self.wait_listening(timeout)
        self.wait_for_line(r"SERVING model=", timeout)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (killing it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server ignored SIGTERM for {timeout} s:\n{self.text}") from None
        finally:
            self._reader.join(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self.log.close()


class ThrottlingProxy:
    """A TCP proxy on 127.0.0.1 that passes what clients send on to 127.0.0.1:`port` at most
    `rate` bytes/s per connection (replies go back at full speed): a client on a slow uplink.

    Args:
      port: the server's port.
      rate: bytes per second, client to server, per connection.
    """

    def __init__(self, port: int, rate: int):
        self._upstream, self.rate = port, rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # so the accept loop notices `close`
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(("127.0.0.1", self._upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for args in ((client, server, self.rate), (server, client, None)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, rate: int | None) -> None:
        chunk = 1 << 16 if rate is None else max(1, rate // 20)
        try:
            while data := source.recv(chunk):
                sink.sendall(data)
                if rate is not None:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def __enter__(self) -> ThrottlingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def uploads(self, request: har_pb2.PredictRequest, count: int, timeout: float = 20) -> list:
        """`count` Predict calls of `request` through the proxy, started at once, each on a
        connection of its own (on one, later calls would wait behind the first's bytes)."""
        return [
            stub(self.target, **{"grpc.use_local_subchannel_pool": 1}).Predict.future(
                request, timeout=timeout
            )
            for _ in range(count)
        ]


def assert_probes_serving(port: int, timeout: float) -> None:
    """Both health services of the server on `port` answer SERVING within `timeout` s."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=timeout
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    own = stub(f"127.0.0.1:{port}").Health(har_pb2.HealthRequest(), timeout=timeout)
    assert own.status == har_pb2.HealthResponse.SERVING
