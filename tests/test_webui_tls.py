"""The web UI's gRPC TLS and mutual-TLS settings, against real TLS model servers.

Nothing is mocked: certificates are made for each run with the openssl CLI (a throwaway CA, a
server certificate for localhost/127.0.0.1, a client certificate, and an unrelated self-signed
CA as the "wrong" one), two `python -m grpc_server.main` subprocesses serve the tiny random
action model (one with --tls-cert/--tls-key, one that also requires client certificates with
--tls-client-ca), and the Flask app is built with webui.create_app from HAR_GRPC_* settings
(the test_config mapping, and the environment for one mutual-TLS case).

Every failing setup is checked against a working one on the same server, so a failure here is
the TLS setting's doing, not a server that is down.
"""

from __future__ import annotations

import io
import math
import shutil
import time
from pathlib import Path

import grpc
import pytest
import test_webui_support as support
from grpc_support import make_test_certs

from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc
from webui import create_app

# --------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """ca.pem signs server.pem (localhost, 127.0.0.1) and client.pem; other-ca.pem signs nothing."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    return make_test_certs(tmp_path_factory.mktemp("webui-certs"), extra_cas=("other-ca",))


# --------------------------------------------------------------------------- servers


def _wait_serving(server: support.GrpcServer, timeout_s: float = 300) -> None:
    """Waits for the SERVING log line (support's wait_serving probes in plaintext, not TLS)."""
    server.wait_listening(timeout_s)
    deadline = time.monotonic() + timeout_s
    while "SERVING model=" not in server.log_text():
        if server.proc.poll() is not None:
            server._fail(f"exited with {server.proc.returncode} while loading")
        if time.monotonic() > deadline:
            server._fail(f"not SERVING after {timeout_s} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def servers(certs, tmp_path_factory):
    """{"tls": server-auth TLS only, "mtls": TLS that requires a client cert signed by ca.pem}.

    Both start at once (model loading overlaps) and are stopped when the module is done.
    """
    model = support.tiny_model_dir(tmp_path_factory)
    log_dir = tmp_path_factory.mktemp("webui-tls-logs")
    common = ["--model", str(model), "--max-batch-size", "1"]
    common += ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    started: dict[str, support.GrpcServer] = {}
    try:
        started["tls"] = support.GrpcServer("tls", common, log_dir)
        mtls_args = [*common, "--tls-client-ca", str(certs / "ca.pem")]
        started["mtls"] = support.GrpcServer("mtls", mtls_args, log_dir)
        for server in started.values():
            _wait_serving(server)
        for server in started.values():
            # "listening on HOST:PORT (tls, N handler threads)"
            assert "(tls, " in server.log_text(), "the server did not say it serves TLS"
        yield started
    finally:
        for server in started.values():
            server.stop()


def _app(target: str, **settings):
    config = {"TESTING": True, "HAR_GRPC_TARGET": target, "HAR_RATE_LIMIT_ENABLED": False}
    config.update(settings)
    return create_app(config)


@pytest.fixture
def make_client():
    """Builds a Flask test client from HAR_* settings; closes every app's gRPC channel after."""
    apps = []

    def make(target: str, **settings):
        app = _app(target, **settings)
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["har_client"].close()


def _tls_settings(certs: Path, *, client_cert: bool = False) -> dict:
    settings = {"HAR_GRPC_TLS": True, "HAR_GRPC_CA_CERT": str(certs / "ca.pem")}
    if client_cert:
        settings["HAR_GRPC_CLIENT_CERT"] = str(certs / "client.pem")
        settings["HAR_GRPC_CLIENT_KEY"] = str(certs / "client.key")
    return settings


# --------------------------------------------------------------------------- assertions


def _post_photo(client, photo: bytes):
    return client.post("/predict", data={"file": (io.BytesIO(photo), "photo.jpg")})


def _assert_prediction(response) -> dict:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    predictions = body["all_predictions"]
    assert sorted(p["action"] for p in predictions) == sorted(support.TINY_CLASSES)
    best = max(predictions, key=lambda p: p["confidence"])
    assert body["action"] == best["action"]
    assert body["confidence"] == pytest.approx(best["confidence"])
    assert math.isclose(sum(p["confidence"] for p in predictions), 1.0, abs_tol=1e-3)
    assert body["model"]["num_classes"] == len(support.TINY_CLASSES)
    assert body["num_frames"] == 1
    return body


def _assert_health_ok(client) -> None:
    response = client.get("/health")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "ok" and body["model_server"] == "SERVING"
    assert body["model"]["num_classes"] == len(support.TINY_CLASSES)


def _assert_unavailable(client, photo: bytes, target: str) -> None:
    """/predict and /health both answer a JSON 503 UNAVAILABLE, with neither the internal
    address nor gRPC core's TLS error text (those go to the web UI's log), and no trace."""
    response = _post_photo(client, photo)
    text = response.get_data(as_text=True)
    assert response.status_code == 503, text
    assert response.mimetype == "application/json", text
    body = response.get_json()
    assert body["code"] == "UNAVAILABLE"
    assert body["error"] == "The model server is not reachable right now; try again in a moment"
    assert target not in text and "ssl" not in text.lower() and "handshake" not in text.lower()
    assert "Traceback" not in text and "action" not in body

    health = client.get("/health")
    assert health.status_code == 503
    assert health.mimetype == "application/json"
    assert health.get_json()["status"] == "unavailable"
    assert health.get_json()["code"] == "UNAVAILABLE"
    assert "Traceback" not in health.get_data(as_text=True)


# --------------------------------------------------------------------------- TLS


def test_tls_with_the_right_ca_predicts_like_the_server(servers, certs, photos, make_client):
    target = servers["tls"].target
    client = make_client(target, **_tls_settings(certs))
    _assert_health_ok(client)
    body = _assert_prediction(_post_photo(client, photos["chelsea"]))

    # The reference: the same photo straight to the server over TLS with the generated stub.
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with grpc.secure_channel(target, creds) as channel:
        reply = har_pb2_grpc.ActionRecognitionStub(channel).Predict(
            har_pb2.PredictRequest(images=[photos["chelsea"]]), timeout=30
        )
    assert body["action"] == reply.action
    assert body["confidence"] == pytest.approx(reply.confidence, abs=1e-5)

    classes = client.get("/classes")
    assert classes.status_code == 200
    assert classes.get_json()["classes"] == list(support.TINY_CLASSES)


def test_server_name_override_is_checked_against_the_certificate(
    servers, certs, photos, make_client
):
    # HAR_GRPC_SERVER_NAME replaces the target host in the certificate check: a name the
    # certificate holds (localhost) is accepted, one it does not hold is refused.
    target = servers["tls"].target
    good = make_client(target, HAR_GRPC_SERVER_NAME="localhost", **_tls_settings(certs))
    _assert_prediction(_post_photo(good, photos["coffee"]))

    bad = make_client(target, HAR_GRPC_SERVER_NAME="model.example", **_tls_settings(certs))
    _assert_unavailable(bad, photos["coffee"], target)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"HAR_GRPC_TLS": True}, id="tls-system-roots-without-our-ca"),
        pytest.param({"HAR_GRPC_TLS": True, "HAR_GRPC_CA_CERT": "other-ca.pem"}, id="wrong-ca"),
        pytest.param({"HAR_GRPC_TLS": False}, id="plaintext-to-tls-server"),
    ],
)
def test_tls_server_refuses_an_untrusting_client_with_json_503(
    servers, certs, photos, make_client, settings
):
    target = servers["tls"].target
    settings = dict(settings)
    if "HAR_GRPC_CA_CERT" in settings:
        settings["HAR_GRPC_CA_CERT"] = str(certs / settings["HAR_GRPC_CA_CERT"])
    _assert_unavailable(make_client(target, **settings), photos["rocket"], target)


# --------------------------------------------------------------------------- mutual TLS


def test_mutual_tls_with_client_cert_from_the_environment(servers, certs, photos, monkeypatch):
    # The deployment path: HAR_* environment variables, parsed by webui.settings.
    for name, value in _tls_settings(certs, client_cert=True).items():
        monkeypatch.setenv(name, "true" if value is True else value)
    monkeypatch.setenv("HAR_GRPC_TARGET", servers["mtls"].target)
    app = create_app({"TESTING": True, "HAR_RATE_LIMIT_ENABLED": False})
    try:
        assert app.config["HAR_GRPC_TLS"] is True
        client = app.test_client()
        _assert_health_ok(client)
        _assert_prediction(_post_photo(client, photos["astronaut"]))
    finally:
        app.extensions["har_client"].close()


def test_mutual_tls_with_client_cert_from_test_config(servers, certs, photos, make_client):
    client = make_client(servers["mtls"].target, **_tls_settings(certs, client_cert=True))
    _assert_health_ok(client)
    _assert_prediction(_post_photo(client, photos["chelsea"]))


def test_mutual_tls_without_a_client_cert_is_refused(servers, certs, photos, make_client):
    target = servers["mtls"].target
    # The same CA-only settings work against the TLS-only server: only the cert is missing.
    _assert_health_ok(make_client(servers["tls"].target, **_tls_settings(certs)))
    _assert_unavailable(make_client(target, **_tls_settings(certs)), photos["chelsea"], target)


def test_mutual_tls_with_a_cert_from_another_ca_is_refused(servers, certs, photos, make_client):
    target = servers["mtls"].target
    settings = _tls_settings(certs)
    settings["HAR_GRPC_CLIENT_CERT"] = str(certs / "other-ca.pem")
    settings["HAR_GRPC_CLIENT_KEY"] = str(certs / "other-ca.key")
    _assert_unavailable(make_client(target, **settings), photos["chelsea"], target)


# --------------------------------------------------------------------------- settings checks


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"HAR_GRPC_CLIENT_CERT": "client.pem"}, "must be set together"),
        ({"HAR_GRPC_CLIENT_KEY": "client.key"}, "must be set together"),
        ({"HAR_GRPC_CA_CERT": "missing.pem"}, r"HAR_GRPC_CA_CERT=.*missing\.pem.*no such file"),
        ({"HAR_GRPC_CLIENT_KEY": "missing.key", "HAR_GRPC_CLIENT_CERT": "client.pem"},
         r"HAR_GRPC_CLIENT_KEY=.*no such file"),
    ],
)  # fmt: skip
def test_tls_file_settings_are_validated_at_startup(certs, settings, message):
    settings = {k: str(certs / v) for k, v in settings.items()}
    with pytest.raises(ValueError, match=message):
        _app("127.0.0.1:1", HAR_GRPC_TLS=True, **settings)


@pytest.mark.parametrize(
    "key", ["HAR_GRPC_CA_CERT", "HAR_GRPC_CLIENT_CERT", "HAR_GRPC_SERVER_NAME"]
)
def test_tls_settings_without_tls_are_refused_not_silently_plaintext(certs, key):
    value = "localhost" if key == "HAR_GRPC_SERVER_NAME" else str(certs / "ca.pem")
    extra = {"HAR_GRPC_CLIENT_KEY": str(certs / "ca.key")} if key == "HAR_GRPC_CLIENT_CERT" else {}
    with pytest.raises(ValueError, match=f"{key}.* set but HAR_GRPC_TLS is off"):
        _app("127.0.0.1:1", HAR_GRPC_TLS=False, **{key: value}, **extra)
