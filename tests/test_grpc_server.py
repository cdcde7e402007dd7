"""The real server with the real default model, as users reach it: grpcurl, a Node.js client, a
standard health client, Python stubs, and the bad-input table from the issue.

One `python -m grpc_server.main` subprocess (the built-in ImageNet MobileNetV2, batch buckets 1
and 2 to keep the compile short) serves the whole module.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import urllib.request
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import REPO, ServerProcess, probabilities, rich_details, stub
from PIL import Image

from grpc_server.config import ServerConfig
from grpc_server.server import HarServer
from har_flax.proto.har.v1 import har_pb2

pytestmark = pytest.mark.slow

CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat"}
MAX_IMAGE_BYTES = 2_000_000
MAX_FRAMES = 8
GRPCURL = Path(sys.executable).parent / "grpcurl"
NODE_CLIENT = REPO / "tests" / "node_client"


@pytest.fixture(scope="module")
def server():
    args = ["--max-batch-size", "2", "--max-image-bytes", str(MAX_IMAGE_BYTES)]
    args += ["--max-frames", str(MAX_FRAMES), "--metrics-port", "0", "--metrics-host"]
    args += ["127.0.0.1", "--grace", "5", "--drain", "0"]
    proc = ServerProcess(args)
    try:
        proc.wait_serving(timeout=600)
        yield proc
        assert proc.terminate() == 0, proc.text
    finally:
        proc.close()


@pytest.fixture(scope="module")
def client(server):
    return stub(server.target)


def _png(array: np.ndarray, **save_kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save_kw)
    return buf.getvalue()


def _encode(im: Image.Image, fmt: str, **save_kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def _predict(client, images, top_k=0, timeout=120) -> har_pb2.PredictResponse:
    return client.Predict(har_pb2.PredictRequest(images=images, top_k=top_k), timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Clients users have.


def _grpcurl(server, *command: str, flags: tuple[str, ...] = (), stdin: str | None = None) -> str:
    """`grpcurl -plaintext FLAGS HOST:PORT COMMAND...`, as a user types it; returns stdout."""
    proc = subprocess.run(
        [str(GRPCURL), "-plaintext", *flags, server.target, *command],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"grpcurl {command}: {proc.stderr}"
    return proc.stdout


def test_grpcurl_lists_describes_and_calls_every_method(server, cat_jpeg):
    services = _grpcurl(server, "list").split()
    assert {"har.v1.ActionRecognition", "grpc.health.v1.Health"} <= set(services)
    assert any(s.startswith("grpc.reflection.") for s in services)

    described = _grpcurl(server, "describe", "har.v1.ActionRecognition")
    for rpc in ("rpc Health", "rpc Classes", "rpc Predict"):
        assert rpc in described
    request_type = _grpcurl(server, "describe", "har.v1.PredictRequest")
    assert "repeated bytes images = 1;" in request_type and "int32 top_k = 2;" in request_type
    # With the .proto's comments: an operator reads the contract without the file.
    assert "// Encoded images: JPEG, PNG, WebP, GIF or BMP." in request_type
    assert "// Classifies one still image or one sequence of frames." in described
    health = _grpcurl(server, "describe", "grpc.health.v1.Health")
    assert "rpc Check" in health and "rpc List" in health

    health = json.loads(_grpcurl(server, "har.v1.ActionRecognition/Health"))
    assert health["status"] == "SERVING"
    assert health["model"]["kind"] == "imagenet" and health["model"]["num_classes"] == 1001
    standard = json.loads(_grpcurl(server, "grpc.health.v1.Health/Check"))
    assert standard == {"status": "SERVING"}

    classes = json.loads(_grpcurl(server, "har.v1.ActionRecognition/Classes"))["classes"]
    assert len(classes) == 1001 and classes[282] == "tabby, tabby cat"

    request = json.dumps({"images": [base64.b64encode(cat_jpeg).decode()], "top_k": 3})
    reply = json.loads(
        _grpcurl(server, "har.v1.ActionRecognition/Predict", flags=("-d", "@"), stdin=request)
    )
    assert reply["action"] in CAT_CLASSES
    assert len(reply["all_predictions"]) == 3
    assert reply["all_predictions"][0]["action"] == reply["action"]


def _node() -> str:
    """The node binary, once tests/node_client's packages are installed (the client's, and
    buf's CLI)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js is not installed")
    modules = NODE_CLIENT / "node_modules"
    if not ((modules / "@grpc" / "grpc-js").is_dir() and (modules / ".bin" / "buf").exists()):
        # `npm ci` installs exactly the committed lock file.
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_CLIENT,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return node


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_reflects_over_either_protocol_and_calls_predict(server, cat_jpeg, protocol):
    """buf curl, grpcurl 1.9+ and grpcui ask reflection v1 first; some newer clients ask only
    that. grpcio-reflection serves v1alpha alone, so the server adds v1."""
    _node()
    buf = [str(NODE_CLIENT / "node_modules" / ".bin" / "buf"), "curl", "--protocol", "grpc",
           "--http2-prior-knowledge", "--reflect-protocol", protocol]  # fmt: skip
    url = f"http://{server.target}"

    def run(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([*buf, *args], input=stdin, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, f"buf curl {args}: {proc.stderr}"
        return proc.stdout

    services = set(run("--list-services", url).split())
    assert {
        "har.v1.ActionRecognition",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } == services
    assert "har.v1.ActionRecognition/Predict" in run("--list-methods", url).split()
    # The request is encoded from the schema that reflection described.
    request = json.dumps({"images": [base64.b64encode(cat_jpeg).decode()], "top_k": 2})
    reply = json.loads(run("-d", "@-", f"{url}/har.v1.ActionRecognition/Predict", stdin=request))
    assert reply["action"] in CAT_CLASSES and len(reply["allPredictions"]) == 2


def test_node_client_calls_classes_and_predict(server, cat_jpeg, client, tmp_path):
    node = _node()
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(cat_jpeg)
    proc = subprocess.run(
        [node, "client.js", server.target, str(photo), "--top-k", "5"],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert len(out["classes"]["classes"]) == 1001
    predict = out["predict"]
    assert predict["action"] in CAT_CLASSES
    assert len(predict["all_predictions"]) == 5
    # The same answer the Python client gets.
    reference = _predict(client, [cat_jpeg], top_k=5)
    assert predict["action"] == reference.action
    assert predict["confidence"] == pytest.approx(reference.confidence, abs=1e-6)


def test_node_client_sees_status_codes(server, tmp_path):
    if shutil.which("node") is None or not (NODE_CLIENT / "node_modules").is_dir():
        pytest.skip("Node.js client not installed (see test_node_client_calls_classes_and_predict)")
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    proc = subprocess.run(
        ["node", "client.js", server.target, str(text)],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "images[0]" in error["details"]
    # The rich details, decoded from grpc-status-details-bin as a Node user would.
    assert error["reason"] == "INVALID_IMAGE" and error["domain"] == "har.v1"
    [violation] = error["field_violations"]
    assert violation["field"] == "images[0]" and "text" in violation["description"]
    assert "retry_delay_s" not in error
    # A server still loading its model: UNAVAILABLE with a RetryInfo.
    loading = HarServer(ServerConfig(host="127.0.0.1", port=0, grace_s=1, drain_s=0))
    loading.start()
    try:
        proc = subprocess.run(
            ["node", "client.js", f"127.0.0.1:{loading.port}", str(text)],
            cwd=NODE_CLIENT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        loading.stop()
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "UNAVAILABLE" and error["reason"] == "MODEL_LOADING"
    assert error["retry_delay_s"] > 0


def test_standard_health_client(server):
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "har.v1.ActionRecognition"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == serving
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(watch).status == serving
    watch.cancel()
    channel.close()


# ---------------------------------------------------------------------------------------------
# Answers.


def test_predict_real_photos(client, photos):
    reply = _predict(client, [photos["chelsea"]])
    assert reply.action in CAT_CLASSES and reply.confidence > 0.3
    assert len(reply.all_predictions) == 1001
    probs = [p.confidence for p in reply.all_predictions]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert reply.all_predictions[0].action == reply.action
    assert reply.model.kind == "imagenet" and reply.model.num_classes == 1001
    assert reply.num_frames == 1 and reply.latency_ms > 0
    top = _predict(client, [photos["chelsea"]], top_k=4)
    assert [p.action for p in top.all_predictions] == [p.action for p in reply.all_predictions[:4]]
    assert _predict(client, [photos["rocket"]]).action in {
        "space shuttle", "missile", "projectile, missile"}  # fmt: skip


def test_classes_and_health(client):
    classes = client.Classes(har_pb2.ClassesRequest(), timeout=10)
    assert len(classes.classes) == 1001 and classes.classes[0] == "background"
    health = client.Health(har_pb2.HealthRequest(), timeout=10)
    assert health.status == har_pb2.HealthResponse.SERVING
    assert health.model == classes.model and len(health.model.version) == 12


# ---------------------------------------------------------------------------------------------
# The bad-input table. Each case: request images and top_k, then the expected code, and for
# failures the google.rpc.BadRequest field and a word the message must contain.


def _bomb_png() -> bytes:
    """A 16x16 PNG whose header claims 50000x50000 pixels (2.5 gigapixels)."""
    data = bytearray(_png(np.zeros((16, 16, 3), np.uint8)))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", 50_000, 50_000)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _noise_jpeg(side: int) -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return _encode(Image.fromarray(noise), "JPEG", quality=98)


def _cases(photos, arrays):
    cat, small = arrays["chelsea"], Image.fromarray(arrays["chelsea"]).resize((64, 48))
    rgba = np.concatenate([cat, np.full(cat.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    gray16 = (np.asarray(Image.fromarray(cat).convert("L"), np.uint16) * 257).astype(np.uint16)
    palette = Image.fromarray(cat).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    frames = [small.rotate(a) for a in (0, 5, 10)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    ok, bad = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
    big = grpc.StatusCode.RESOURCE_EXHAUSTED
    jpeg = photos["chelsea"]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    noise_gif = _encode(noise[0], "GIF", save_all=True, append_images=noise[1:], duration=100)
    return {
        # name: (images, top_k, code, field, message word)
        "no images": ([], 0, bad, "images", "no images"),
        "empty bytes": ([b""], 0, bad, "images[0]", "empty"),
        "truncated jpeg": ([jpeg[: len(jpeg) // 3]], 0, bad, "images[0]", "truncated"),
        "text file": ([b"hello, I am a text file\n"], 0, bad, "images[0]", "text"),
        "pdf": (
            [b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"],
            0,
            bad,
            "images[0]",
            "PDF",
        ),  # fmt: skip
        "1x1 image": ([_png(cat[:1, :1])], 0, bad, "images[0]", "too small"),
        "second frame bad": ([jpeg, b"junk"], 0, bad, "images[1]", "images[1]"),
        "negative top_k": ([jpeg], -1, bad, "top_k", "out of range"),
        "huge top_k": ([jpeg], 1_000_000, bad, "top_k", "out of range"),
        "top_k one past the classes": ([jpeg], 1002, bad, "top_k", "out of range"),
        "top_k every class": ([jpeg], 1001, ok, None, None),
        "bad gif frame": ([noise_gif[: len(noise_gif) * 9 // 10]], 0, bad, "images[0]", "frame 2"),
        "decompression bomb": ([_bomb_png()], 0, big, "images[0]", "pixels"),
        "over --max-image-bytes": ([_noise_jpeg(1400)], 0, big, "images[0]", "MiB"),
        "too many frames": (
            [_png(np.asarray(small))] * (MAX_FRAMES + 1),
            0,
            big,
            "images",
            "frames",
        ),  # fmt: skip
        "rgba png": ([_png(rgba)], 0, ok, None, None),
        "cmyk jpeg": ([_encode(Image.fromarray(cat).convert("CMYK"), "JPEG")], 0, ok, None, None),
        "grayscale jpeg": (
            [_encode(Image.fromarray(cat).convert("L"), "JPEG")],
            0,
            ok,
            None,
            None,
        ),  # fmt: skip
        "16-bit grayscale png": ([_png(gray16)], 0, ok, None, None),
        "palette + transparency png": (
            [_encode(palette, "PNG", transparency=0)],
            0,
            ok,
            None,
            None,
        ),  # fmt: skip
        "animated gif": ([gif.getvalue()], 0, ok, None, None),
    }


CASE_NAMES = [
    "no images", "empty bytes", "truncated jpeg", "text file", "pdf", "1x1 image",
    "second frame bad", "negative top_k", "huge top_k", "top_k one past the classes",
    "top_k every class", "bad gif frame", "decompression bomb",
    "over --max-image-bytes", "too many frames", "rgba png", "cmyk jpeg", "grayscale jpeg",
    "16-bit grayscale png", "palette + transparency png", "animated gif",
]  # fmt: skip


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_table(name, client, photos, photo_arrays):
    images, top_k, code, field, word = _cases(photos, photo_arrays)[name]
    if code == grpc.StatusCode.OK:
        reply = _predict(client, images, top_k)
        assert reply.action and len(reply.all_predictions) == 1001
        if name == "animated gif":
            assert reply.num_frames == 3  # the per-frame model averages over every frame
        if name == "rgba png":  # opaque alpha: exactly the RGB photo's answer
            rgb = _predict(client, [_png(photo_arrays["chelsea"])])
            assert probabilities(reply) == probabilities(rgb)
        if name != "16-bit grayscale png":
            assert reply.action in CAT_CLASSES, reply.action
    else:
        with pytest.raises(grpc.RpcError) as e:
            _predict(client, images, top_k)
        err = e.value
        assert err.code() == code, err.details()
        assert word.lower() in err.details().lower()
        assert "Traceback" not in err.details() and 'File "' not in err.details()
        details = rich_details(err)
        assert details["violations"] and details["violations"][0][0] == field
        assert details["reason"]
        if name == "bad gif frame":  # BadRequest names fields; the frame is in the description
            assert details["violations"][0][1].startswith("frame 2: truncated or corrupt GIF")
    # Still serving after every case.
    health = client.Health(har_pb2.HealthRequest(), timeout=10)
    assert health.status == har_pb2.HealthResponse.SERVING


def test_message_over_the_grpc_limit_is_resource_exhausted(server, client):
    huge = b"\xff\xd8" + bytes(17 * 1024 * 1024)  # over the 16 MiB default message limit
    with pytest.raises(grpc.RpcError) as e:
        _predict(client, [huge])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Refused by the server itself (under 2x the limit), so with a reason, and in the log.
    assert rich_details(e.value)["reason"] == "MESSAGE_TOO_LARGE"
    server.wait_for_line(r"Predict code=RESOURCE_EXHAUSTED .*reason=MESSAGE_TOO_LARGE", 10)
    assert client.Health(har_pb2.HealthRequest(), timeout=10).status == 1


def test_phone_sized_photo_under_16_mib_is_accepted(server, photo_arrays):
    """Over gRPC's own 4 MiB default but under 16 MiB: needs the raised message limit."""
    big = _noise_jpeg(2600)
    assert 4 * 1024 * 1024 < len(big) < 16 * 1024 * 1024
    with pytest.raises(grpc.RpcError) as e:
        _predict(stub(server.target), [big])
    # Accepted by the transport; refused by --max-image-bytes (2 MB here), not by gRPC.
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_details(e.value)["reason"] == "IMAGE_TOO_LARGE"


def test_exif_rotated_jpeg_equals_the_upright_photo(client, photo_arrays):
    upright = photo_arrays["chelsea"]
    # A phone stores the sensor's sideways pixels and says "rotate 90° clockwise" (6) in EXIF.
    sideways = np.ascontiguousarray(np.rot90(upright, k=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_jpeg = _encode(Image.fromarray(sideways), "JPEG", quality=95, exif=exif)
    # The reference: the same decoded pixels turned upright by hand, stored losslessly.
    decoded = np.asarray(Image.open(io.BytesIO(rotated_jpeg)).convert("RGB"))
    by_hand = np.ascontiguousarray(np.rot90(decoded, k=-1))
    assert by_hand.shape == upright.shape
    reply = _predict(client, [rotated_jpeg])
    reference = _predict(client, [_png(by_hand)])
    assert probabilities(reply) == probabilities(reference)
    assert reply.action in CAT_CLASSES
    # And the orientation matters: the sideways pixels alone answer differently.
    assert probabilities(_predict(client, [_png(decoded)])) != probabilities(reply)


# ---------------------------------------------------------------------------------------------
# Operations: metrics and the access log.


def _refusals(text: str, reason: str) -> float:
    predict = 'method="/har.v1.ActionRecognition/Predict"'
    sample = rf'^har_grpc_refusals_total{{{predict},reason="{reason}"}} (\S+)$'
    found = re.search(sample, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_and_access_log(server, client, cat_jpeg):
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    before = urllib.request.urlopen(url, timeout=10).read().decode()
    _predict(client, [cat_jpeg])
    with pytest.raises(grpc.RpcError):
        _predict(client, [b""])
    # Over --max-frames: RESOURCE_EXHAUSTED, as an overload is; the reason tells them apart.
    with pytest.raises(grpc.RpcError):
        _predict(client, [cat_jpeg] * (MAX_FRAMES + 1))
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    predict = 'method="/har.v1.ActionRecognition/Predict"'
    assert f'har_grpc_requests_total{{code="OK",{predict}}}' in text
    assert f'har_grpc_requests_total{{code="INVALID_ARGUMENT",{predict}}}' in text
    for reason in ("INVALID_IMAGE", "IMAGE_TOO_LARGE"):
        assert _refusals(text, reason) - _refusals(before, reason) == 1, text
        server.wait_for_line(rf"Predict code=\w+ .*reason={reason}", 10)
    assert 'reason="OK"' not in text and "reason=OK" not in server.text
    assert "har_grpc_request_latency_seconds_bucket" in text
    assert "har_batch_size_count" in text and "har_batch_queue_depth" in text
    assert 'har_model_info{kind="imagenet"' in text and "har_model_ready 1.0" in text

    lines = [line for line in server.text.splitlines() if "event=rpc" in line]
    ok = [line for line in lines if "Predict code=OK" in line]
    assert ok, server.text[-2000:]
    for key in ("latency_ms=", "batch=", "frames=", "peer=", "bytes="):
        assert key in ok[-1]
    assert any("Predict code=INVALID_ARGUMENT" in line for line in lines)
    # No image bytes (raw or base64) in the log: every line stays short.
    assert max(len(line) for line in server.text.splitlines()) < 1000
