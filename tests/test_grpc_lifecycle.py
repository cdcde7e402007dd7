"""`python -m grpc_server.main` as a process: configured from HAR_SERVE_* variables, NOT_SERVING
until warm, SIGTERM under load (health flips first, in-flight calls finish, exit 0), and the
exit codes for a bad model, a bad setting and a busy port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import REPO, ServerProcess, jpeg, shared_tmp, stub, tiny_model_dir

from har_flax.proto.har.v1 import har_pb2

TOKEN = "lifecycle-token"
CLIENTS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(shared_tmp(tmp_path_factory))


def _watch_health(target: str, events: list, stop: threading.Event) -> None:
    """Records (time, status name) from grpc.health.v1 Watch until the stream ends."""
    channel = grpc.insecure_channel(target)
    try:
        for reply in health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="har.v1.ActionRecognition"), timeout=300
        ):
            events.append((time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(
                reply.status)))  # fmt: skip
            if stop.is_set():
                break
    except grpc.RpcError:
        pass  # the server went away: the stream ends
    finally:
        channel.close()


@pytest.mark.slow
def test_sigterm_under_load_flips_health_first_finishes_in_flight_and_exits_0(
    model_dir, photo_arrays
):
    # Configured only through the environment, as a container would be. Each batch's first
    # request waits up to 1 s for company and 6 clients never fill a batch of 8, so at any
    # moment about 6 requests are in flight inside the server.
    env = {
        "HAR_SERVE_MODEL": str(model_dir),
        "HAR_SERVE_BATCHING": "on",
        "HAR_SERVE_MAX_BATCH_SIZE": "8",
        "HAR_SERVE_MAX_WAIT_US": "1000000",
        "HAR_SERVE_AUTH_TOKEN": TOKEN,
        "HAR_SERVE_GRACE": "20",
        "HAR_SERVE_DRAIN": "0.5",
    }
    server = ServerProcess([], env=env)
    try:
        server.wait_listening()
        events: list = []
        watcher_stop = threading.Event()
        watcher = threading.Thread(
            target=_watch_health, args=(server.target, events, watcher_stop), daemon=True
        )
        watcher.start()
        server.wait_serving(timeout=300)

        image = jpeg(photo_arrays["coffee"], size=64)
        client = stub(server.target)
        # The token came from HAR_SERVE_AUTH_TOKEN.
        with pytest.raises(grpc.RpcError) as e:
            client.Predict(har_pb2.PredictRequest(images=[image]), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

        calls: list[tuple[float, float, grpc.StatusCode]] = []
        lock, quit_clients = threading.Lock(), threading.Event()

        def run_client():
            c = stub(server.target)
            while not quit_clients.is_set():
                t0 = time.monotonic()
                try:
                    c.Predict(har_pb2.PredictRequest(images=[image]), timeout=60,
                              metadata=(("authorization", f"Bearer {TOKEN}"),))  # fmt: skip
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                with lock:
                    calls.append((t0, time.monotonic(), code))
                if code != grpc.StatusCode.OK:
                    return  # refused: this client goes elsewhere

        threads = [threading.Thread(target=run_client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(2.5)  # a couple of full batches, then clients are mid-request
        sigterm_at = time.monotonic()
        exit_code = server.terminate(timeout=60)
        exited_at = time.monotonic()
        quit_clients.set()
        for t in threads:
            t.join(70)
        watcher_stop.set()
        watcher.join(10)

        assert exit_code == 0, server.text[-3000:]
        statuses = [s for _, s in events]
        assert statuses[:3] == ["NOT_SERVING", "SERVING", "NOT_SERVING"], statuses
        flipped_at = events[2][0]
        assert sigterm_at <= flipped_at < exited_at
        ok_before = [c for c in calls if c[2] == grpc.StatusCode.OK and c[1] < sigterm_at]
        assert ok_before, "no request completed before SIGTERM"
        in_flight = [c for c in calls if c[0] < sigterm_at < c[1]]
        assert in_flight, calls
        # Every request the server had when SIGTERM came was answered, not dropped.
        assert all(code == grpc.StatusCode.OK for _, _, code in in_flight), in_flight
        refused = [c for c in calls if c[2] != grpc.StatusCode.OK]
        assert all(code == grpc.StatusCode.UNAVAILABLE for _, _, code in refused), refused
        assert all(end >= flipped_at for _, end, _ in refused), "refused before NOT_SERVING"
        log = server.text
        assert log.index("shutting down") < log.rindex("stopped")
    finally:
        server.close()


def _run(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "grpc_server.main", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_bad_environment_value_exits_2_naming_the_variable():
    proc = _run([], env={"HAR_SERVE_MAX_BATCH_SIZE": "lots"})
    assert proc.returncode == 2
    assert "HAR_SERVE_MAX_BATCH_SIZE='lots'" in proc.stderr


def test_inconsistent_flags_exit_2_with_what_to_fix():
    proc = _run(["--tls-cert", "server.pem"])
    assert proc.returncode == 2 and "tls_cert and tls_key must be given together" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run(["--max-pixels", "50000000", "--max-total-pixels", "40000000"])
    assert proc.returncode == 2 and "max_total_pixels (40,000,000) must be at least max_pixels " \
        "(50,000,000)" in proc.stderr  # fmt: skip


def test_raising_the_frame_limit_alone_raises_the_request_limit_with_it():
    from grpc_server.config import ServerConfig

    default = ServerConfig().image_limits()
    raised = ServerConfig(max_pixels=150_000_000).image_limits()
    assert raised.max_pixels == raised.max_total_pixels == 150_000_000
    assert default.max_total_pixels == 128_000_000 and default.max_pixels == 40_000_000
    both = ServerConfig(max_pixels=1000, max_total_pixels=5000, max_frames=3).image_limits()
    assert (both.max_pixels, both.max_total_pixels, both.max_frames) == (1000, 5000, 3)


def test_busy_port_exits_3():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _run(["--host", "127.0.0.1", "--port", str(port)])
    assert proc.returncode == 3, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_model_directory_exits_1(tmp_path):
    proc = _run(["--host", "127.0.0.1", "--port", "0", "--model", str(tmp_path / "nope")],
                timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "cannot load the model" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_flag_reads_its_environment_variable_and_flags_win(tmp_path):
    from grpc_server.main import build_parser, config_from_args

    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    env = {
        "HAR_SERVE_PORT": "6000",
        "HAR_SERVE_NO_BATCHING": "yes",
        "HAR_SERVE_MAX_WAIT_US": "50",
        "HAR_SERVE_AUTH_TOKEN_FILE": str(token_file),
        "HAR_SERVE_RATE_LIMIT": "2.5",
        "HAR_SERVE_MAX_TOTAL_PIXELS": "200000000",
        "HAR_SERVE_KEEPALIVE_MIN_INTERVAL": "30",
        "HAR_SERVE_REFLECTION_STREAMS": "0",
        "HAR_SERVE_REFLECTION_IDLE": "5",
    }
    config = config_from_args(build_parser(env).parse_args(["--port", "7000"]))
    assert (config.port, config.batching, config.max_wait_us) == (7000, False, 50)
    assert (config.max_total_pixels, config.keepalive_min_interval_s) == (200_000_000, 30.0)
    assert (config.reflection_streams, config.reflection_idle_s) == (0, 5.0)
    assert config.auth_token == "from-a-file" and config.rate_limit == 2.5
    assert "from-a-file" not in repr(config)
    # Every flag has a variable: the help names one for each.
    parser = build_parser({})
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all("[env HAR_SERVE_" in (a.help or "") for a in flags)


def test_sigterm_while_the_model_compiles_exits_0_promptly(model_dir):
    server = ServerProcess(["--model", str(model_dir), "--batching", "on", "--max-batch-size", "8"])
    try:
        server.wait_listening()
        time.sleep(1.0)  # loading and compiling (four buckets take seconds)
        started = time.monotonic()
        assert server.terminate(timeout=60) == 0, server.text
        assert time.monotonic() - started < 30
        assert "SERVING model=" not in server.text and "stopped" in server.text
    finally:
        server.close()


def test_open_watch_stream_does_not_hold_shutdown_for_the_grace_period(model_dir):
    """SIGTERM with a grpc.health.v1 Watch open: the watcher sees NOT_SERVING, then its stream
    ends (status OK) after the drain, and the process exits in about drain time, not grace."""
    server = ServerProcess(["--model", str(model_dir), "--grace", "15", "--drain", "0.3"])
    channel = None
    try:
        server.wait_serving(timeout=300)
        channel = grpc.insecure_channel(server.target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        assert server.terminate(timeout=60) == 0, server.text[-3000:]
        elapsed = time.monotonic() - started
        rest = [reply.status for reply in watch]  # raises if the stream was cut, not ended
        assert rest == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert elapsed < 7, f"shutdown took {elapsed:.1f} s with --grace 15 --drain 0.3"
    finally:
        if channel is not None:
            channel.close()
        server.close()
