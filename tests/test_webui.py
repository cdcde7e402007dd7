"""The web UI app (Flask test client) against real gRPC model servers (no mocks of our server).

The reference for every successful answer is the same request sent straight to the gRPC server
with the generated stub: the HTTP API must say exactly what the model server said. Error tests
make the real server fail for real (bad image, too many pixels, wrong token, its own rate limit,
a deadline, a closed port).
"""

from __future__ import annotations

import html.parser
import io
import json
import re
import subprocess
import sys
import textwrap

import grpc
import pytest
import test_webui_support as support
from PIL import Image

from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc
from webui import create_app
from webui.security import CONTENT_SECURITY_POLICY

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny(request) -> support.GrpcServer:
    return support.tiny_server(request)


@pytest.fixture(scope="session")
def rate_limited(request) -> support.GrpcServer:
    """The tiny model behind a gRPC server that allows one call per 100 s per client."""
    model = support.tiny_model_dir(request.getfixturevalue("tmp_path_factory"))
    args = ["--model", str(model), "--no-warmup", "--rate-limit", "0.01", "--rate-burst", "1"]
    return support.shared_server("rate-limited", args, request)


@pytest.fixture(scope="session")
def stub(tiny):
    """A direct gRPC client of the tiny server: the reference the HTTP answers must match."""
    with grpc.insecure_channel(tiny.target) as channel:
        yield har_pb2_grpc.ActionRecognitionStub(channel)


AUTH = (("authorization", f"Bearer {support.TINY_TOKEN}"),)


def make_app(target: str, **settings):
    config = {
        "TESTING": True,
        "HAR_GRPC_TARGET": target,
        "HAR_GRPC_TOKEN": support.TINY_TOKEN,
        "HAR_RATE_LIMIT_ENABLED": False,
    }
    config.update(settings)
    return create_app(config)


@pytest.fixture
def app(tiny):
    app = make_app(tiny.target)
    yield app
    app.extensions["har_client"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def jpeg(width: int, height: int, color=(200, 120, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG")
    return buf.getvalue()


def animated_gif(frames: int = 4) -> bytes:
    images = [Image.new("RGB", (48, 48), (40 * i, 255 - 40 * i, 90)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=100)
    return buf.getvalue()


def upload(client, *files: tuple[bytes, str], **form):
    data = {"file": [(io.BytesIO(b), name) for b, name in files], **form}
    return client.post("/predict", data=data, content_type="multipart/form-data")


def as_json(reply: har_pb2.PredictResponse) -> dict:
    """The reference: a direct gRPC reply in the HTTP API's shape (rounded as the API rounds)."""
    return {
        "action": reply.action,
        "confidence": round(reply.confidence, 6),
        "all_predictions": [
            {"action": p.action, "confidence": round(p.confidence, 6)}
            for p in reply.all_predictions
        ],
    }


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json", response.data[:200]
    body = response.get_json()
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"]
    return body


# --------------------------------------------------------------------------- the process


def test_importing_and_running_the_web_ui_never_imports_jax(tiny):
    code = textwrap.dedent(
        f"""
        import sys, io
        import webui, webui.main
        app = webui.create_app({{"HAR_GRPC_TARGET": "{tiny.target}",
                                 "HAR_GRPC_TOKEN": "{support.TINY_TOKEN}"}})
        c = app.test_client()
        assert c.get("/").status_code == 200
        assert c.get("/health").status_code == 200
        r = c.post("/predict", data={{"file": (io.BytesIO(open(sys.argv[1], "rb").read()),
                                                "cat.jpg")}})
        assert r.status_code == 200, r.data
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax"))
        print("JAX modules:", bad)
        sys.exit(1 if bad else 0)
        """
    )
    sample = support.REPO / "har_flax/assets/samples/cat.jpg"
    result = subprocess.run(
        [sys.executable, "-c", code, str(sample)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_settings_come_from_the_environment(monkeypatch, tiny):
    monkeypatch.setenv("HAR_GRPC_TARGET", tiny.target)
    monkeypatch.setenv("HAR_MAX_UPLOAD_MB", "2.5")
    monkeypatch.setenv("HAR_RATE_LIMIT_PREDICT", "7 per minute")
    monkeypatch.setenv("HAR_RATE_LIMIT_ENABLED", "no")
    app = create_app()
    assert app.config["HAR_GRPC_TARGET"] == tiny.target
    assert app.config["MAX_CONTENT_LENGTH"] == int(2.5 * 1024 * 1024)
    assert app.config["HAR_RATE_LIMIT_PREDICT"] == "7 per minute"
    assert app.config["HAR_RATE_LIMIT_ENABLED"] is False
    # test_config wins over the environment.
    assert create_app({"HAR_MAX_UPLOAD_MB": 1}).config["MAX_CONTENT_LENGTH"] == 1024 * 1024


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("HAR_MAX_UPLOAD_MB", "ten", "HAR_MAX_UPLOAD_MB"),
        ("HAR_MAX_UPLOAD_MB", "0", "must be > 0"),
        ("HAR_GRPC_TLS", "maybe", "true/false"),
        ("HAR_GRPC_CA_CERT", "/nonexistent/ca.pem", "no such file"),
    ],
)
def test_bad_settings_fail_at_startup_naming_the_variable(monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(words)):
        create_app()


def test_the_channel_opens_lazily_and_is_reused(tiny):
    app = make_app(tiny.target)
    model_client = app.extensions["har_client"]
    # create_app makes no connection (gunicorn may fork after it).
    assert model_client._channel is None
    c = app.test_client()
    assert c.get("/classes").status_code == 200
    channel = model_client._channel
    assert channel is not None
    for _ in range(3):
        assert c.get("/health").status_code == 200
    assert model_client._channel is channel
    model_client.close()


# --------------------------------------------------------------------------- the JSON API


def test_predict_a_photo_answers_what_the_model_server_answers(client, stub, cat_jpeg):
    response = upload(client, (cat_jpeg, "cat.jpg"))
    assert response.status_code == 200, response.data
    body = response.get_json()
    assert list(body)[:3] == ["action", "confidence", "all_predictions"]  # DESIGN.md's shape
    reference = stub.Predict(har_pb2.PredictRequest(images=[cat_jpeg]), metadata=AUTH)
    assert {k: body[k] for k in ("action", "confidence", "all_predictions")} == as_json(reference)
    assert sorted(p["action"] for p in body["all_predictions"]) == sorted(support.TINY_CLASSES)
    assert body["model"]["kind"] == "action" and body["model"]["num_classes"] == 3
    assert body["num_frames"] >= 1 and body["latency_ms"] > 0


def test_several_files_are_one_frame_sequence_in_order(client, stub, photos):
    frames = [photos["chelsea"], photos["astronaut"], photos["rocket"]]
    response = upload(client, *[(f, f"frame{i}.jpg") for i, f in enumerate(frames)])
    assert response.status_code == 200, response.data
    reference = stub.Predict(har_pb2.PredictRequest(images=frames), metadata=AUTH)
    assert {k: response.get_json()[k] for k in ("action", "confidence", "all_predictions")} == (
        as_json(reference)
    )


def test_an_animated_gif_is_passed_on_whole(client, stub):
    gif = animated_gif()
    response = upload(client, (gif, "clip.gif"))
    assert response.status_code == 200, response.data
    reference = stub.Predict(har_pb2.PredictRequest(images=[gif]), metadata=AUTH)
    assert response.get_json()["all_predictions"] == as_json(reference)["all_predictions"]


def test_top_k_limits_the_predictions(client, cat_jpeg):
    response = upload(client, (cat_jpeg, "cat.jpg"), top_k="2")
    assert response.status_code == 200
    predictions = response.get_json()["all_predictions"]
    assert len(predictions) == 2
    assert predictions[0]["confidence"] >= predictions[1]["confidence"]


def test_classes_and_health_reflect_the_model_server(client, stub):
    classes = client.get("/classes")
    assert classes.status_code == 200
    reference = stub.Classes(har_pb2.ClassesRequest(), metadata=AUTH)
    assert classes.get_json()["classes"] == list(reference.classes) == list(support.TINY_CLASSES)
    health = client.get("/health")
    assert health.status_code == 200
    assert health.get_json()["status"] == "ok"
    assert health.get_json()["model_server"] == "SERVING"
    assert health.get_json()["model"]["version"] == reference.model.version


# --------------------------------------------------------------------------- errors


def test_upload_mistakes_are_400_with_a_message(client):
    body = assert_json_error(client.post("/predict", data={}), 400)
    assert "'file'" in body["error"]
    body = assert_json_error(upload(client, (b"", "empty.jpg")), 400)
    assert "empty.jpg is empty" in body["error"]
    body = assert_json_error(upload(client, (jpeg(64, 64), "a.jpg"), top_k="many"), 400)
    assert "top_k" in body["error"]


def test_a_text_file_is_400_naming_the_field(client):
    body = assert_json_error(upload(client, (b"just some notes\n" * 20, "notes.txt")), 400)
    assert body["code"] == "INVALID_ARGUMENT"
    assert "not an image" in body["error"]
    assert body["violations"][0]["field"] == "images[0]"


def test_too_many_pixels_for_the_model_server_is_413(client):
    side = int(support.TINY_MAX_PIXELS**0.5) + 100
    body = assert_json_error(upload(client, (jpeg(side, side), "huge.jpg")), 413)
    assert body["code"] == "RESOURCE_EXHAUSTED"
    assert body["reason"] == "IMAGE_TOO_LARGE"
    assert "pixels" in body["error"]


def test_a_body_over_max_content_length_is_413_json(tiny):
    client = make_app(tiny.target, HAR_MAX_UPLOAD_MB=0.05).test_client()
    body = assert_json_error(upload(client, (b"\xff" * 60_000, "big.jpg")), 413)
    assert "0.05 MB" in body["error"]


def test_model_server_overload_is_429_with_retry_after(rate_limited):
    client = make_app(rate_limited.target).test_client()
    first = client.get("/classes")
    assert first.status_code == 200, first.data
    body = assert_json_error(client.get("/classes"), 429)
    assert body["code"] == "RESOURCE_EXHAUSTED" and body["reason"] == "RATE_LIMITED"
    assert int(client.get("/classes").headers["Retry-After"]) >= 1


def test_a_wrong_token_is_401(tiny, cat_jpeg):
    client = make_app(tiny.target, HAR_GRPC_TOKEN="not-the-token").test_client()
    body = assert_json_error(upload(client, (cat_jpeg, "cat.jpg")), 401)
    assert body["code"] == "UNAUTHENTICATED" and "HAR_GRPC_TOKEN" in body["error"]


def test_no_model_server_is_503_everywhere():
    client = make_app(f"127.0.0.1:{support.free_port()}").test_client()
    for response in (
        client.get("/health"),
        client.get("/classes"),
        upload(client, (jpeg(64, 64), "a.jpg")),
    ):
        body = assert_json_error(response, 503)
        assert "unavailable" in body["error"]
    assert client.get("/").status_code == 200  # the page still loads, and says why it waits


def test_a_missed_deadline_is_504(tiny, cat_jpeg):
    client = make_app(tiny.target, HAR_GRPC_TIMEOUT_S=1e-6).test_client()
    body = assert_json_error(upload(client, (cat_jpeg, "cat.jpg")), 504)
    assert body["code"] == "DEADLINE_EXCEEDED"


def test_unknown_routes_and_methods_are_json_for_the_api(client):
    assert_json_error(client.get("/no/such/thing"), 404)
    body = assert_json_error(client.get("/predict"), 405)
    assert "POST" in body["error"]
    assert "POST" in client.get("/predict").headers["Allow"]
    assert_json_error(client.delete("/classes"), 405)
    page = client.get("/no/such/page", headers={"Accept": "text/html"})
    assert page.status_code == 404 and page.mimetype == "text/html"


def test_an_unexpected_error_is_500_json_without_a_traceback(tiny):
    app = make_app(tiny.target)

    @app.get("/predict/boom")
    def boom():
        raise RuntimeError("secret internal detail")

    body = assert_json_error(app.test_client().get("/predict/boom"), 500)
    assert "secret" not in body["error"]


def test_rate_limit_is_per_client_and_spares_health(tiny, cat_jpeg):
    app = make_app(tiny.target, HAR_RATE_LIMIT_ENABLED=True, HAR_RATE_LIMIT_PREDICT="2 per minute")
    client = app.test_client()
    alice = {"REMOTE_ADDR": "10.0.0.1"}
    for _ in range(2):
        assert upload_as(client, alice, cat_jpeg).status_code == 200
    body = assert_json_error(upload_as(client, alice, cat_jpeg), 429)
    assert "2 per 1 minute" in body["error"]
    assert upload_as(client, {"REMOTE_ADDR": "10.0.0.2"}, cat_jpeg).status_code == 200
    for _ in range(5):
        assert client.get("/health", environ_base=alice).status_code == 200


def upload_as(client, environ: dict, image: bytes):
    return client.post(
        "/predict", data={"file": (io.BytesIO(image), "cat.jpg")}, environ_base=environ
    )


# --------------------------------------------------------------------------- page and headers


class _PageAudit(html.parser.HTMLParser):
    """Collects what a strict CSP and an offline page forbid: inline code and foreign URLs."""

    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append(attrs)
            self._in_script = True
        for name, value in attrs.items():
            if name.startswith("on") or name == "style":
                self.problems.append(f"<{tag} {name}=...> (inline code/style)")
            if name in ("src", "href", "action") and value and re.match(r"^(https?:)?//", value):
                self.problems.append(f"<{tag} {name}={value}> (not offline)")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.problems.append("inline <script> body")


def test_the_page_has_no_inline_script_and_no_foreign_urls(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    audit = _PageAudit()
    audit.feed(page.get_data(as_text=True))
    assert audit.scripts and all(s.get("src", "").startswith("/static/") for s in audit.scripts)
    assert audit.problems == []
    for needed in ("file-input", "dropzone", "Recognize action", "spinner", "Try another"):
        assert needed in page.get_data(as_text=True)
    for asset in ("/static/app.js", "/static/app.css", "/static/favicon.svg"):
        response = client.get(asset)
        assert response.status_code == 200, asset
        # An SVG namespace is a name, not a download.
        data = response.data.replace(b'xmlns="http://www.w3.org/2000/svg"', b"")
        assert not re.search(rb"https?://", data), f"{asset} references the network"
        assert b"innerHTML" not in response.data and b"insertAdjacentHTML" not in response.data


@pytest.mark.parametrize("path", ["/", "/classes", "/static/app.js", "/nope"])
def test_security_headers_on_every_response(client, path):
    headers = client.get(path).headers
    csp = headers["Content-Security-Policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"


def test_metrics_count_requests_and_model_server_calls(client, cat_jpeg):
    assert upload(client, (cat_jpeg, "cat.jpg")).status_code == 200
    assert upload(client, (b"text, not a photo", "x.txt")).status_code == 400
    text = client.get("/metrics").get_data(as_text=True)
    metric = re.compile(r"^har_webui_http_requests_total\{(.*?)\} (\S+)$", re.MULTILINE)
    counts = {labels: float(v) for labels, v in metric.findall(text)}
    assert counts['endpoint="/predict",method="POST",status="200"'] == 1
    assert counts['endpoint="/predict",method="POST",status="400"'] == 1
    assert 'har_webui_grpc_calls_total{code="OK",rpc="Predict"} 1.0' in text
    assert 'har_webui_grpc_calls_total{code="INVALID_ARGUMENT",rpc="Predict"} 1.0' in text
    assert "har_webui_http_request_duration_seconds_bucket" in text


# --------------------------------------------------------------------------- har-webui


def test_har_webui_serves_until_sigterm(tiny, tmp_path):
    log = (tmp_path / "webui.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "webui.main", "--grpc-target", tiny.target, "--port", "0",
         "--grpc-token", support.TINY_TOKEN],
        cwd=support.REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = None
        for _ in range(100):
            match = re.search(r"listening on (http://\S+/)", (tmp_path / "webui.log").read_text())
            if match:
                url = match.group(1)
                break
            assert proc.poll() is None, (tmp_path / "webui.log").read_text()
            support.time.sleep(0.1)
        assert url, "har-webui printed no URL"
        support.wait_http(url + "health", proc=proc)
        with support.urllib.request.urlopen(url + "classes") as response:
            assert json.load(response)["classes"] == list(support.TINY_CLASSES)
    finally:
        code = support.stop_process(proc)
        log.close()
    assert code == 0


def test_har_webui_rejects_bad_settings():
    result = subprocess.run(
        [sys.executable, "-m", "webui.main", "--max-upload-mb", "-1"],
        capture_output=True, text=True, timeout=60, cwd=support.REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "HAR_MAX_UPLOAD_MB must be > 0" in result.stderr
