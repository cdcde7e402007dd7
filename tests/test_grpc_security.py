"""TLS, mutual TLS, bearer-token auth and per-client rate limiting, against real servers.

Certificates are made for each run with the openssl CLI (a throwaway CA, a server certificate
for localhost/127.0.0.1, a client certificate). The model is the tiny random action model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import (
    ThrottlingProxy,
    assert_probes_serving,
    jpeg,
    make_test_certs,
    rich_details,
    shared_tmp,
    stub,
    tiny_model_dir,
)

from grpc_server.config import ServerConfig
from grpc_server.server import HarServer, ServerError
from har_flax.proto.har.v1 import har_pb2

TOKEN = "s3cret-token-for-tests"
GRPCURL = Path(sys.executable).parent / "grpcurl"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    return make_test_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from har_flax.predictor import Predictor

    return Predictor.load(tiny_model_dir(shared_tmp(tmp_path_factory)), batch_sizes=(1,))


def _start(predictor, **overrides) -> HarServer:
    config = ServerConfig(host="127.0.0.1", port=0, grace_s=1, drain_s=0, max_batch_size=1,
                          **overrides)  # fmt: skip
    server = HarServer(config)
    server.start()
    server.load(predictor)
    return server


@pytest.fixture(scope="module")
def tls_server(predictor, certs):
    server = _start(predictor, tls_cert=str(certs / "server.pem"),
                    tls_key=str(certs / "server.key"), auth_token=TOKEN)  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image(photo_arrays) -> bytes:
    return jpeg(photo_arrays["chelsea"], size=96)


def _tls(certs, client_cert=False):
    root = (certs / "ca.pem").read_bytes()
    if not client_cert:
        return grpc.ssl_channel_credentials(root)
    key, chain = (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
    return grpc.ssl_channel_credentials(root, key, chain)


def _bearer(token):
    return (("authorization", f"Bearer {token}"),)


def test_tls_and_token_are_required_for_predict(tls_server, certs, image):
    target = f"localhost:{tls_server.port}"
    request = har_pb2.PredictRequest(images=[image])
    # Plaintext against a TLS port: the handshake fails, nothing is served.
    with pytest.raises(grpc.RpcError) as e:
        stub(target).Predict(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    client = stub(target, _tls(certs))
    with pytest.raises(grpc.RpcError) as e:
        client.Predict(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in e.value.details()
    assert rich_details(e.value)["reason"] == "UNAUTHENTICATED"
    with pytest.raises(grpc.RpcError) as e:
        client.Classes(har_pb2.ClassesRequest(), metadata=_bearer("wrong"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid" in e.value.details()

    reply = client.Predict(request, metadata=_bearer(TOKEN), timeout=30)
    assert reply.action in ("clapping", "dancing", "running")
    classes = client.Classes(har_pb2.ClassesRequest(), metadata=_bearer(TOKEN), timeout=10)
    assert len(classes.classes) == 3


def test_bearer_scheme_is_case_insensitive(tls_server, certs):
    """RFC 7235: the auth scheme is case-insensitive; the token itself is not."""
    client = stub(f"localhost:{tls_server.port}", _tls(certs))
    for value in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"bEaReR  {TOKEN}"):
        reply = client.Classes(har_pb2.ClassesRequest(), metadata=(("authorization", value),),
                               timeout=10)  # fmt: skip
        assert len(reply.classes) == 3, value
    for value in (f"bearer {TOKEN.upper()}", f"Basic {TOKEN}", f"bearer{TOKEN}", TOKEN,
                  f"bearer {TOKEN}x", "bearer"):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            client.Classes(har_pb2.ClassesRequest(), metadata=(("authorization", value),),
                           timeout=10)  # fmt: skip
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
        assert "invalid" in e.value.details()


def test_health_and_reflection_stay_open_without_a_token(tls_server, certs):
    channel = grpc.secure_channel(f"localhost:{tls_server.port}", _tls(certs))
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    har_health = stub(f"localhost:{tls_server.port}", _tls(certs)).Health(
        har_pb2.HealthRequest(), timeout=10
    )
    assert har_health.status == har_pb2.HealthResponse.SERVING
    # grpcurl over TLS, trusting our CA: reflection without a token, Classes with one.
    cmd = [str(GRPCURL), "-cacert", str(certs / "ca.pem"), f"localhost:{tls_server.port}"]
    listed = subprocess.run([*cmd, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "har.v1.ActionRecognition" in listed.stdout
    cmd.insert(1, "-H")
    cmd.insert(2, f"authorization: Bearer {TOKEN}")
    out = subprocess.run([*cmd, "har.v1.ActionRecognition/Classes"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["classes"] == ["clapping", "dancing", "running"]


def test_mutual_tls_requires_a_client_certificate(predictor, certs, image):
    server = _start(
        predictor,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )
    target = f"localhost:{server.port}"
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub(target, _tls(certs)).Predict(har_pb2.PredictRequest(images=[image]), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        reply = stub(target, _tls(certs, client_cert=True)).Predict(
            har_pb2.PredictRequest(images=[image]), timeout=30
        )
        assert reply.all_predictions
    finally:
        server.stop()


def test_missing_certificate_file_is_a_clear_error(certs):
    server = HarServer(ServerConfig(port=0, tls_cert=str(certs / "nope.pem"),
                                    tls_key=str(certs / "server.key")))  # fmt: skip
    with pytest.raises(ServerError, match=r"cannot read the TLS certificate \(--tls-cert\)") as e:
        server.start()
    assert "port in use" not in str(e.value)  # a file problem, not a port problem


def test_rate_limit_per_client_with_retry_info(predictor):
    server = _start(predictor, rate_limit=2.0, rate_burst=2)
    client = stub(f"127.0.0.1:{server.port}")
    try:
        codes, retry = [], None
        for _ in range(5):
            try:
                client.Classes(har_pb2.ClassesRequest(), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                retry = rich_details(e)
                assert "rate limit exceeded" in e.details()
        assert codes[:2] == [grpc.StatusCode.OK] * 2
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[2:]
        assert retry["reason"] == "RATE_LIMITED" and 0 < retry["retry_s"] <= 0.5 + 1e-6
        # The bucket is the client's address, not its connection: a new connection (another
        # source port) is refused too.
        other = stub(f"127.0.0.1:{server.port}", **{"grpc.use_local_subchannel_pool": 1})
        with pytest.raises(grpc.RpcError) as e:
            other.Classes(har_pb2.ClassesRequest(), timeout=10)
        assert rich_details(e.value)["reason"] == "RATE_LIMITED"
        # Health is never rate limited; after the advised wait the client is served again.
        for _ in range(5):
            client.Health(har_pb2.HealthRequest(), timeout=10)
        time.sleep(retry["retry_s"] + 0.05)
        assert client.Classes(har_pb2.ClassesRequest(), timeout=10).classes
    finally:
        server.stop()


def test_a_refused_slow_upload_is_answered_at_once_and_never_holds_the_probes_threads(predictor):
    """A client without the token uploading slowly (a phone photo on a poor uplink, or an
    attacker) is refused before its request is read: at once, mid-upload, and without holding a
    thread while the rest of the upload trickles in; health checks keep answering."""
    server = _start(predictor, auth_token=TOKEN)
    # 1 MB at 100 kB/s: each upload takes 10 s, longer with six sharing the link.
    request = har_pb2.PredictRequest(images=[b"\xff\xd8" + bytes(1_000_000)])
    try:
        with ThrottlingProxy(server.port, rate=100_000) as proxy:
            started = time.monotonic()
            # More uploads than the server has threads for probes and refusals together.
            uploads = proxy.uploads(request, 6)
            time.sleep(0.5)  # every call has arrived and is uploading
            assert_probes_serving(server.port, timeout=2)
            for upload in uploads:
                with pytest.raises(grpc.RpcError) as e:
                    upload.result()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
            assert time.monotonic() - started < 3, "the refusals waited for the uploads"
    finally:
        server.stop()
