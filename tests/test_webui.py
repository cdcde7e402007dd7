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
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import requests
import test_webui_support as support
from grpc_status import rpc_status
from PIL import Image

from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc
from webui import create_app
from webui.grpc_client import TroubleLog
from webui.security import CONTENT_SECURITY_POLICY

MiB = 1024 * 1024

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
def small_messages(request) -> support.GrpcServer:
    """The tiny model behind a gRPC server that takes requests of at most 1 MiB."""
    model = support.tiny_model_dir(request.getfixturevalue("tmp_path_factory"))
    args = ["--model", str(model), "--no-warmup", "--max-message-bytes", str(MiB)]
    return support.shared_server("small-messages", args, request)


HOLD_S = 3


@pytest.fixture(scope="session")
def one_worker(request) -> support.GrpcServer:
    """The tiny model behind a gRPC server with one handler thread and a queue of one, whose
    Predicts each hold that thread HOLD_S: the batch waits for company that cannot come."""
    model = support.tiny_model_dir(request.getfixturevalue("tmp_path_factory"))
    args = ["--model", str(model), "--no-warmup", "--workers", "1", "--max-queue", "1",
            "--batching", "on", "--max-batch-size", "2",
            "--max-wait-us", str(HOLD_S * 10**6)]  # fmt: skip
    return support.shared_server("one-worker", args, request)


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


@pytest.fixture
def serve():
    """Serves apps on real HTTP ports (threaded werkzeug); returns their base URLs."""
    servers, apps = [], []

    def start(app) -> str:
        apps.append(app)
        servers.append(support.WsgiServer(app))
        return servers[-1].url

    yield start
    for server in servers:
        server.stop()
    for app in apps:
        app.extensions["har_client"].close()


@pytest.fixture
def http():
    """A real HTTP client that talks to 127.0.0.1 directly (no proxy from the environment)."""
    with requests.Session() as session:
        session.trust_env = False
        yield session


def jpeg_of_size(photo: bytes, size: int) -> bytes:
    """`photo` padded to exactly `size` bytes with JPEG comment segments: the same picture."""
    need = size - len(photo)
    assert need >= 4
    segments = []
    while need:
        n = min(need, 65537)  # marker (2) + length (2) + at most 65533 bytes of comment
        if 0 < need - n < 4:
            n = need - 4
        segments.append(b"\xff\xfe" + (n - 2).to_bytes(2, "big") + b"\0" * (n - 4))
        need -= n
    padded = photo[:2] + b"".join(segments) + photo[2:]
    assert len(padded) == size
    return padded


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
    assert app.config["HAR_MAX_UPLOAD_MB"] == 2.5
    # The body may carry the multipart framing on top of the files' own limit.
    assert app.config["MAX_CONTENT_LENGTH"] == int(2.5 * MiB) + MiB
    assert app.config["HAR_RATE_LIMIT_PREDICT"] == "7 per minute"
    assert app.config["HAR_RATE_LIMIT_ENABLED"] is False
    # test_config wins over the environment.
    assert create_app({"HAR_MAX_UPLOAD_MB": 1}).config["MAX_CONTENT_LENGTH"] == 2 * MiB


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("HAR_MAX_UPLOAD_MB", "ten", "HAR_MAX_UPLOAD_MB"),
        ("HAR_MAX_UPLOAD_MB", "0", "must be > 0"),
        ("HAR_GRPC_TLS", "maybe", "true/false"),
        ("HAR_GRPC_CA_CERT", "/nonexistent/ca.pem", "no such file"),
        # More than one request to the model server can carry (16 MiB unless told otherwise).
        ("HAR_MAX_UPLOAD_MB", "40", "HAR_GRPC_MAX_MESSAGE_MB"),
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
    # 2**31 does not fit PredictRequest.top_k (int32): it was a 500 with a traceback.
    for top_k in ("many", "-1", "1.5", str(2**31), str(10**30)):
        body = assert_json_error(upload(client, (jpeg(64, 64), "a.jpg"), top_k=top_k), 400)
        assert body["error"] == (
            "top_k must be a whole number from 0 to the number of classes (0 = all classes), "
            f"got {top_k!r}"
        ), body
    # Within int32 the model server, which knows the classes, answers.
    body = assert_json_error(upload(client, (jpeg(64, 64), "a.jpg"), top_k=str(2**31 - 1)), 400)
    assert body["code"] == "INVALID_ARGUMENT" and "use 1..3" in body["error"], body


def test_a_text_file_is_400_naming_the_file(client):
    body = assert_json_error(upload(client, (b"just some notes\n" * 20, "notes.txt")), 400)
    assert body["code"] == "INVALID_ARGUMENT"
    assert body["error"].startswith("notes.txt: ") and "not an image" in body["error"]
    assert body["violations"][0]["field"] == "images[0]"  # for programs: the gRPC field
    assert body["violations"][0]["file"] == "notes.txt"


def test_a_bad_frame_is_named_by_its_file_and_frame_number(client, cat_jpeg):
    truncated = cat_jpeg[: len(cat_jpeg) // 2]
    body = assert_json_error(upload(client, (cat_jpeg, "cat.jpg"), (truncated, "trunc.jpg")), 400)
    assert body["error"].startswith("trunc.jpg (frame 2): "), body["error"]
    assert "truncated" in body["error"] and "images[" not in body["error"]
    assert body["violations"] == [
        {"field": "images[1]", "description": body["violations"][0]["description"],
         "file": "trunc.jpg"}
    ]  # fmt: skip


def test_too_many_pixels_for_the_model_server_is_413(client):
    side = int(support.TINY_MAX_PIXELS**0.5) + 100
    body = assert_json_error(upload(client, (jpeg(side, side), "huge.jpg")), 413)
    assert body["code"] == "RESOURCE_EXHAUSTED"
    assert body["reason"] == "IMAGE_TOO_LARGE"
    assert "pixels" in body["error"]


def test_a_body_over_max_content_length_is_413_json(tiny):
    client = make_app(tiny.target, HAR_MAX_UPLOAD_MB=0.05).test_client()
    body = assert_json_error(upload(client, (b"\xff" * 60_000, "big.jpg")), 413)
    assert "0.05 MiB" in body["error"]
    # The limit is on the files together: two frames under it each, over it together.
    frames = [(b"\xff" * 30_000, "a.jpg"), (b"\xff" * 30_000, "b.jpg")]
    body = assert_json_error(upload(client, *frames), 413)
    assert "0.05 MiB" in body["error"]
    # A body past MAX_CONTENT_LENGTH (files plus the form's framing) is refused unread.
    body = assert_json_error(upload(client, (b"\xff" * (2 * MiB), "bigger.jpg")), 413)
    assert "0.05 MiB" in body["error"]


def test_files_up_to_the_limit_pass_whatever_the_form_adds(tiny, serve, http, cat_jpeg):
    # What the page checks (the files' bytes, data-max-upload-bytes) is what the server
    # allows: a file 50 bytes under the limit is classified, one byte over is 413.
    url = serve(make_app(tiny.target, HAR_MAX_UPLOAD_MB=0.5))
    limit = MiB // 2
    under = jpeg_of_size(cat_jpeg, limit - 50)
    response = http.post(url + "predict", files={"file": ("under.jpg", under, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["action"] in support.TINY_CLASSES
    page = http.get(url).text
    assert f'data-max-upload-bytes="{limit}"' in page and "up to 0.5 MiB" in page
    # Two frames and a top_k field, 50 bytes under together: still only the files count.
    halves = (jpeg_of_size(cat_jpeg, limit // 2), jpeg_of_size(cat_jpeg, limit // 2 - 50))
    files = [("file", (f"{i}.jpg", half, "image/jpeg")) for i, half in enumerate(halves)]
    response = http.post(url + "predict", files=files, data={"top_k": "1"})
    assert response.status_code == 200, response.text
    assert len(response.json()["all_predictions"]) == 1
    over = jpeg_of_size(cat_jpeg, limit + 1)
    response = http.post(url + "predict", files={"file": ("over.jpg", over, "image/jpeg")})
    assert response.status_code == 413, response.text
    assert response.json()["error"].startswith("Upload too large: the limit is 0.5 MiB ")


def test_a_form_over_werkzeugs_limits_is_an_actionable_413_at_once(serve, http):
    """Found in review: werkzeug refuses a form of more than 1000 parts (1001 small frames,
    3 MB) or a field without a file name over 500 KB part-way through the body; the 413
    handler then read Content-Length more bytes, and the development server never answered.
    (Under gunicorn the answer came, saying the 10 MiB limit was exceeded: see test_stack.)"""
    from har_flax.images import ImageLimits
    from webui import errors

    assert errors._MODEL_SERVER_MAX_FRAMES == ImageLimits().max_frames  # named in the message
    url = serve(make_app("127.0.0.1:1"))  # refused before any call to the model server
    frame = b"\xff\xd8" + b"\0" * 3000
    for files in (
        [("file", (f"{i}.jpg", frame, "image/jpeg")) for i in range(1001)],
        [("file", (None, b"\0" * 600_000))],  # curl -F file=<photo.jpg: text, no file name
    ):
        start = time.monotonic()
        response = http.post(url + "predict", files=files, timeout=20)
        assert time.monotonic() - start < 10
        assert response.status_code == 413, response.text
        assert response.json()["error"] == (
            "Upload refused: more than 1,000 parts in the form, or a form field that is not a "
            "file over 500,000 bytes. Send at most 64 frames (the model server's default "
            "--max-frames), each as a file in the field 'file' "
            "(with curl: -F file=@photo.jpg, not file=<photo.jpg)"
        )
    # The same mistake with a small photo is a 400 saying so (it was "got no files").
    response = http.post(url + "predict", files=[("file", (None, frame))], timeout=20)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("The field 'file' came as text, without a file")
    # The connection is still usable: the server read the whole body, nothing was left over.
    assert http.get(url + "predict", timeout=10).status_code == 405


def test_model_server_overload_is_429_with_retry_after(rate_limited):
    client = make_app(rate_limited.target).test_client()
    first = client.get("/classes")
    assert first.status_code == 200, first.data
    body = assert_json_error(client.get("/classes"), 429)
    assert body["code"] == "RESOURCE_EXHAUSTED" and body["reason"] == "RATE_LIMITED"
    assert int(client.get("/classes").headers["Retry-After"]) >= 1


def test_retry_after_is_the_model_servers_and_only_on_errors(rate_limited, serve, http):
    # The web UI's own limiter is on, with a window (a day) far longer than the model
    # server's RetryInfo (about 100 s): its Retry-After must not replace the server's, and
    # must not appear on answers that are not errors.
    app = make_app(rate_limited.target, HAR_RATE_LIMIT_ENABLED=True,
                   HAR_RATE_LIMIT_DEFAULT="1000 per day")  # fmt: skip
    url = serve(app)
    page = http.get(url)
    assert page.status_code == 200 and "Retry-After" not in page.headers
    for _ in range(2):  # the first may still find a token in the server's bucket
        response = http.get(url + "classes")
        if response.status_code == 200:
            assert "Retry-After" not in response.headers
        else:
            break
    # The reference: the model server's own RetryInfo, asked directly from the same address.
    with grpc.insecure_channel(rate_limited.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            har_pb2_grpc.ActionRecognitionStub(channel).Classes(har_pb2.ClassesRequest())
    details = rpc_status.from_call(refused.value).details
    retry = next(d for d in details if d.TypeName() == "google.rpc.RetryInfo")
    from google.rpc import error_details_pb2

    info = error_details_pb2.RetryInfo()
    retry.Unpack(info)
    expected = math.ceil(info.retry_delay.ToNanoseconds() / 1e9)
    response = http.get(url + "classes")
    assert response.status_code == 429, response.text
    assert response.json()["reason"] == "RATE_LIMITED"
    assert abs(int(response.headers["Retry-After"]) - expected) <= 1, (
        response.headers["Retry-After"], expected
    )  # fmt: skip


def test_a_full_model_server_is_503_with_its_retry_after(one_worker, serve, http, cat_jpeg):
    # One Predict holds the server's only handler thread, a second waits in its queue of one;
    # the web UI's Predict then finds it full (OVERLOADED, RetryInfo 0.5 s).
    url = serve(make_app(one_worker.target))
    with grpc.insecure_channel(one_worker.target) as channel:
        predict = har_pb2_grpc.ActionRecognitionStub(channel).Predict
        request = har_pb2.PredictRequest(images=[cat_jpeg])
        held = [predict.future(request, timeout=30)]
        time.sleep(0.5)  # the first has its thread
        held.append(predict.future(request, timeout=30))
        time.sleep(0.5)  # the second is queued
        response = http.post(url + "predict", files={"file": ("cat.jpg", cat_jpeg)}, timeout=60)
        for call in held:
            assert call.result().action  # both were answered in the end
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"  # the server's 0.5 s, in whole seconds
    body = response.json()
    assert body["code"] == "RESOURCE_EXHAUSTED" and body["reason"] == "OVERLOADED"
    assert body["error"] == "The model server is busy right now; try again in a moment"


def test_a_bare_resource_exhausted_is_overload_not_too_large(serve, http, cat_jpeg):
    # gRPC core's "Concurrent RPC limit exceeded!" carries no details. It says the server is
    # full, not that the upload is too big: 503 with a Retry-After, so clients come back.
    server = support.BareGrpcServer(max_concurrent_rpcs=1)
    try:
        with grpc.insecure_channel(server.target) as channel:
            held = channel.unary_unary(
                "/har.v1.ActionRecognition/Predict",
                request_serializer=har_pb2.PredictRequest.SerializeToString,
                response_deserializer=har_pb2.PredictResponse.FromString,
            ).future(har_pb2.PredictRequest(images=[cat_jpeg]), timeout=30)
            assert server.predicting.wait(10)  # the one slot is taken
            url = serve(make_app(server.target))
            response = http.post(url + "predict", files={"file": ("cat.jpg", cat_jpeg)})
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) >= 1
            body = response.json()
            assert body["code"] == "RESOURCE_EXHAUSTED"
            assert "busy" in body["error"] and "Concurrent" not in body["error"]
            server.release.set()
            assert held.result().action == "waiting"
    finally:
        server.stop()


def test_grpc_cores_message_size_limit_is_an_actionable_413(
    small_messages, serve, http, cat_jpeg, caplog
):
    # The web UI was told the server takes 8 MiB; it takes 1 MiB. The person learns the real
    # limit in plain words; the operator gets the settings to fix in the log.
    app = make_app(small_messages.target, HAR_MAX_UPLOAD_MB=4, HAR_GRPC_MAX_MESSAGE_MB=8)
    url = serve(app)
    photo = jpeg_of_size(cat_jpeg, 3 * MiB)
    with caplog.at_level(logging.WARNING, logger="webui"):
        response = http.post(url + "predict", files={"file": ("big.jpg", photo, "image/jpeg")})
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["code"] == "RESOURCE_EXHAUSTED"
    # The limit named is the server's (1 MiB of message, or gRPC core's ceiling above it).
    stated = re.fullmatch(
        r"The upload is larger than the model server accepts \((\d+(?:\.\d)?) MiB\); "
        r"send a smaller photo or fewer frames",
        body["error"],
    )
    assert stated, body["error"]
    assert 1 <= float(stated.group(1)) < 3
    assert "HAR_MAX_UPLOAD_MB" in caplog.text


@pytest.mark.parametrize("token", ["not-the-token", ""], ids=["wrong-token", "no-token"])
def test_a_token_the_model_server_refuses_is_the_web_uis_fault(tiny, cat_jpeg, caplog, token):
    # The browser user can do nothing about it: a 502 that says so, /health not ok (so the
    # deployment's probes notice), and the details for the operator in the log.
    client = make_app(tiny.target, HAR_GRPC_TOKEN=token).test_client()
    with caplog.at_level(logging.ERROR, logger="webui"):
        health = client.get("/health")
        body = assert_json_error(upload(client, (cat_jpeg, "cat.jpg")), 502)
    assert health.status_code == 503
    assert health.get_json()["status"] == "misconfigured"
    assert "rejected its credentials" in health.get_json()["error"]
    assert body["code"] == "UNAUTHENTICATED"
    assert body["error"].startswith(
        "The web UI is misconfigured: the model server rejected its credentials"
    )
    assert "HAR_GRPC_TOKEN" in caplog.text and tiny.target in caplog.text
    assert_json_error(client.get("/classes"), 502)


def test_trouble_with_the_model_server_is_logged_once_per_interval_with_a_count(caplog):
    """An outage fails every request: one line per kind per 30 s, the rest counted, and a line
    when it is over (the stack test sees the same lines in gunicorn's log)."""
    now = [0.0]
    trouble = TroubleLog(every_s=30, clock=lambda: now[0])
    lines = []

    def fail(kind: str, at: float, outage: bool = True) -> None:
        now[0] = at
        trouble.log(logging.WARNING, kind, "%s at %s", kind, "x:1", outage=outage)

    with caplog.at_level(logging.INFO, logger="webui"):
        for at in (0, 1, 2):
            fail("unavailable", at)
        fail("overloaded", 3, outage=False)  # another kind has its own interval
        lines.append(list(caplog.messages))
        fail("unavailable", 31)
        now[0] = 40
        trouble.answered("x:1")
        trouble.answered("x:1")  # nothing more to say
        fail("unavailable", 41)  # a new outage is news at once
    assert lines[0] == ["unavailable at x:1", "overloaded at x:1"]
    assert caplog.messages[2:] == [
        "unavailable at x:1 (and 2 more like this since the last such line)",
        "the model server at x:1 answers again, after 40 s and 4 failed calls",
        "unavailable at x:1",
    ]


def test_no_model_server_is_503_everywhere_without_internals():
    target = f"127.0.0.1:{support.free_port()}"
    client = make_app(target).test_client()
    for response in (
        client.get("/health"),
        client.get("/classes"),
        upload(client, (jpeg(64, 64), "a.jpg")),
    ):
        body = assert_json_error(response, 503)
        assert "not reachable" in body["error"]
        # Neither the internal address nor gRPC core's text reaches the browser.
        for internal in (target, str(target.rsplit(":")[1]), "ipv4", "failed to connect"):
            assert internal not in body["error"]
    assert client.get("/").status_code == 200  # the page still loads, and says why it waits


def test_the_web_ui_reconnects_within_seconds_of_the_model_server_returning(tiny, serve, http):
    # The model server is down long enough for gRPC's default reconnect backoff (1 s, x1.6
    # per failed attempt, up to 120 s) to reach 4-6 s between attempts; the web UI's channel
    # must still notice the server's return within a few seconds.
    front = support.TcpForwarder()
    front.reject()  # accepts and drops every connection: each is a reconnect attempt
    try:
        url = serve(make_app(front.target))
        start = time.monotonic()
        while time.monotonic() - start < 8:
            assert http.get(url + "health").status_code == 503
            time.sleep(0.25)
        # Bring the server back right after an attempt: the next one is a full backoff away.
        attempts = len(front.accepted)
        deadline = time.monotonic() + 12
        while len(front.accepted) == attempts:
            assert time.monotonic() < deadline, f"no reconnect attempt: {front.accepted}"
            time.sleep(0.02)
        front.close()
        front.forward(tiny.target)
        back = time.monotonic()
        while http.get(url + "health").status_code != 200:
            waited = time.monotonic() - back
            assert waited < 4, f"still 503 {waited:.1f} s after the server came back"
            time.sleep(0.1)
    finally:
        front.close()


def test_a_proxy_in_the_environment_is_skipped_for_loopback_only(tiny, monkeypatch):
    """Found in review: with http_proxy/grpc_proxy set and no no_proxy for 127.0.0.1, gRPC sent
    the web UI's calls to a loopback model server through the proxy (503 everywhere, as in
    `make serve` behind a corporate proxy). A model server elsewhere still goes through it."""
    proxy = support.ConnectProxy(tiny.target)
    try:
        for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
            monkeypatch.delenv(name, raising=False)
        # gRPC reads these as each channel is made: set before the app's first call.
        for name, value in support.proxy_env(support.DEAD_PROXY).items():
            if "proxy" in name.lower():
                monkeypatch.setenv(name, value)

        def assert_classes_answer(target):
            app = make_app(target)
            try:
                response = app.test_client().get("/classes")
                assert response.status_code == 200, response.data
            finally:
                app.extensions["har_client"].close()

        port = tiny.target.rsplit(":", 1)[1]
        for target in (tiny.target, f"localhost:{port}"):
            assert_classes_answer(target)
        monkeypatch.setenv("grpc_proxy", proxy.url)
        remote = f"har-model.invalid:{port}"  # only the proxy can reach it
        assert_classes_answer(remote)
        assert proxy.asked and set(proxy.asked) == {remote}
    finally:
        proxy.close()


def test_a_missed_deadline_is_504(tiny):
    # A 1 us deadline, and 60 photos, whose decoding (about 100 ms) outlasts it by far: gRPC's
    # deadline timers run every few ms, so one small photo was sometimes answered (200) before
    # either side noticed, on a busy machine; and a photo over the server's pixel limit is
    # refused from its header at once (413), also before. Each is under that limit.
    client = make_app(tiny.target, HAR_GRPC_TIMEOUT_S=1e-6).test_client()
    photos = [(jpeg(540, 540), f"frame{i}.jpg") for i in range(60)]
    assert 540 * 540 < support.TINY_MAX_PIXELS
    body = assert_json_error(upload(client, *photos), 504)
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
    refused = upload_as(client, alice, cat_jpeg)
    body = assert_json_error(refused, 429)
    assert "2 per 1 minute" in body["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 61  # the limiter's own window (60 s)
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


def start_har_webui(tmp_path, *args: str) -> tuple[subprocess.Popen, str]:
    """Runs `har-webui ... --port 0`; returns the process and its URL once /health is 200."""
    log_path = tmp_path / "webui.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "webui.main", "--port", "0", *args],
            cwd=support.REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = None
    for _ in range(300):
        match = re.search(r"listening on (http://\S+/)", log_path.read_text())
        if match:
            url = match.group(1)
            break
        if proc.poll() is not None:
            pytest.fail(f"har-webui exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.1)
    if url is None:
        support.stop_process(proc, signal.SIGKILL)
        pytest.fail("har-webui printed no URL")
    support.wait_http(url + "health", proc=proc, log=log_path)
    return proc, url


def test_har_webui_serves_until_sigterm(tiny, tmp_path):
    proc, url = start_har_webui(
        tmp_path, "--grpc-target", tiny.target, "--grpc-token", support.TINY_TOKEN
    )
    try:
        with support.urllib.request.urlopen(url + "classes") as response:
            assert json.load(response)["classes"] == list(support.TINY_CLASSES)
    finally:
        code = support.stop_process(proc)
    assert code == 0


def test_har_webui_finishes_an_upload_in_progress_at_sigterm(tiny, tmp_path, cat_jpeg):
    proc, url = start_har_webui(
        tmp_path, "--grpc-target", tiny.target, "--grpc-token", support.TINY_TOKEN
    )
    port = int(url.rsplit(":", 1)[1].strip("/"))
    boundary = "har-sigterm-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cat.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + cat_jpeg
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            # Half the photo, then the stop signal while the app waits for the rest.
            conn.sendall(head + body[: len(body) // 2])
            time.sleep(1.5)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while True:  # it stops accepting new connections...
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                except OSError:
                    pass  # e.g. a timeout on a loaded machine: try again
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.1)
            assert proc.poll() is None, "har-webui exited with an upload in progress"
            conn.sendall(body[len(body) // 2 :])  # ...and finishes the one in progress
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 200"), answer[:500]
        prediction = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert prediction["action"] in support.TINY_CLASSES
        assert proc.wait(timeout=15) == 0
    finally:
        support.stop_process(proc, signal.SIGKILL)


def test_har_webui_rejects_bad_settings():
    result = subprocess.run(
        [sys.executable, "-m", "webui.main", "--max-upload-mb", "-1"],
        capture_output=True, text=True, timeout=60, cwd=support.REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--max-upload-mb must be > 0" in result.stderr  # named as the user gave it
    # An upload limit the model server cannot take (16 MiB unless told otherwise) is refused,
    # naming what to change: the flag, or the environment variable, whichever set it.
    result = subprocess.run(
        [sys.executable, "-m", "webui.main", "--max-upload-mb", "40"],
        capture_output=True, text=True, timeout=60, cwd=support.REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--max-upload-mb 40 does not fit" in result.stderr
    assert "lower --max-upload-mb, or raise both" in result.stderr
    assert "at most 16 MiB (HAR_GRPC_MAX_MESSAGE_MB" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "webui.main"],
        capture_output=True, text=True, timeout=60, cwd=support.REPO,
        env={**os.environ, "HAR_MAX_UPLOAD_MB": "40"},
    )  # fmt: skip
    assert result.returncode == 2 and "HAR_MAX_UPLOAD_MB=40 does not fit" in result.stderr
    app = create_app({"HAR_MAX_UPLOAD_MB": 40, "HAR_GRPC_MAX_MESSAGE_MB": 64})
    assert app.extensions["har_client"]._max_send_bytes == 64 * MiB
