"""The production stack end to end: nginx → gunicorn → webui → gRPC server (default model).

nginx (the Debian package) runs the shipped site config from deploy/nginx/, rendered only
where a deployment would change it (ports, the static folder, certificate paths), as a
foreground process with its own prefix and temp folders. gunicorn runs deploy/gunicorn.conf.py
with two workers. The model server is the built-in ImageNet model, shared with the browser test.
Also here: the monitoring configs against the live metrics, and `make serve` (scripts/serve_all.py).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import re
import runpy
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import test_webui_support as support
import yaml

DEPLOY = support.REPO / "deploy"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
OPENSSL = shutil.which("openssl")
CAT_CLASSES = ("tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx")
MiB = 1024 * 1024

needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="needs the Debian nginx package (.ci/run installs it: apt-get install -y nginx)",
)
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- processes


@pytest.fixture(scope="session")
def default_grpc(request) -> support.GrpcServer:
    return support.default_server(request)


@pytest.fixture(scope="module")
def gunicorn(default_grpc, tmp_path_factory):
    """deploy/gunicorn.conf.py with two workers, over the default model; yields its base URL."""
    tmp = tmp_path_factory.mktemp("gunicorn")
    port = support.free_port()
    env = support.env_without_proxies()
    env.update(
        HAR_WEBUI_BIND=f"127.0.0.1:{port}",
        HAR_WEBUI_WORKERS="2",
        HAR_WEBUI_THREADS="4",
        HAR_GRPC_TARGET=default_grpc.target,
        HAR_TRUSTED_PROXIES="1",
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "prometheus"),
    )
    log = (tmp / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py")],
        cwd=support.REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        support.wait_http(url + "health", timeout_s=120, proc=proc, log=tmp / "gunicorn.log")
        yield {"url": url, "log": tmp / "gunicorn.log", "prometheus_dir": tmp / "prometheus"}
    finally:
        support.stop_process(proc)
        log.close()


def test_gunicorn_logs_an_outage_in_its_own_format_once_and_leaves_nothing(default_grpc, tmp_path):
    """Found in a soak test: an outage wrote one bare line per request (600 in 30 s, no time
    or level); two instances shared one metrics folder, the second emptying the first's; and
    gunicorn 25.1+ reported a control-socket ERROR at every start where HOME is read-only."""
    front = support.TcpForwarder()  # the model server's address, nothing behind it yet
    port = support.free_port()
    (tmp_path / "tmp").mkdir()
    env = support.env_without_proxies()
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(
        HAR_WEBUI_BIND=f"127.0.0.1:{port}",
        HAR_WEBUI_WORKERS="1",
        HAR_WEBUI_THREADS="4",
        HAR_GRPC_TARGET=front.target,
        TMPDIR=str(tmp_path / "tmp"),
        HOME="/etc/hostname/home",  # a file: no ~/.gunicorn can be made there
    )
    log_path = tmp_path / "gunicorn.log"
    url = f"http://127.0.0.1:{port}/"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py")],
            cwd=support.REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            support.wait_http(url, timeout_s=120, proc=proc, log=log_path)
            (metrics_dir,) = (tmp_path / "tmp").glob("har-webui-prometheus-*")
            for _ in range(20):
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(url + "health", timeout=30)
                assert e.value.code == 503
            front.forward(default_grpc.target)
            support.wait_http(url + "health", timeout_s=60, proc=proc, log=log_path)
        finally:
            exit_code = support.stop_process(proc)
            front.close()
    text = log_path.read_text(errors="replace")
    assert exit_code == 0, text
    stamp = r"^\[[^]]+\] \[\d+\] \[WARNING\] the model server at " + re.escape(front.target)
    assert len(re.findall(stamp + " is unavailable", text, flags=re.M)) == 1, text
    again = re.search(stamp + r" answers again, after \d+ s and (\d+) failed calls", text, re.M)
    assert again and int(again.group(1)) >= 20, text
    assert "Control server" not in text and "ERROR" not in text, text
    assert not metrics_dir.exists(), "the instance's own metrics folder is left behind"


def test_gunicorn_names_the_form_limit_a_many_part_upload_is_over(gunicorn):
    """Found in review: 1001 small frames (3 MB, over werkzeug's 1000 form parts) were refused
    as "Upload too large: the limit is 10 MiB" under gunicorn (and never answered under the
    development server: see test_webui)."""
    frames = [(f"{i}.jpg", b"\xff\xd8" + b"\0" * 3000, "image/jpeg") for i in range(1001)]
    body, headers = multipart(frames)
    status, _, answer = request(gunicorn["url"] + "predict", data=body, headers=headers)
    assert status == 413, answer
    assert json.loads(answer)["error"].startswith("Upload refused: more than 1,000 parts"), answer


def test_each_gunicorn_instance_outside_systemd_has_its_own_metrics_folder(tmp_path, monkeypatch):
    """A second instance empties its folder as it starts: a shared one took the first's counts."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    folders = []
    for _ in range(2):
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "set, so that monkeypatch restores it")
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        monkeypatch.setenv("HAR_WEBUI_OWN_PROMETHEUS_DIR", "")
        tempfile.tempdir = None  # read TMPDIR again
        try:
            settings = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
        finally:
            tempfile.tempdir = None
        folders.append(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
        assert settings["control_socket_disable"] is True
    assert folders[0] != folders[1] and all(f.parent == tmp_path and f.is_dir() for f in folders)


def render_site(name: str, replacements: dict[str, str]) -> str:
    """A shipped deploy/nginx file with the deployment-specific strings replaced.

    Every replaced string must occur: if the shipped file changes shape, this fails instead of
    silently testing something else.
    """
    text = (DEPLOY / "nginx" / name).read_text()
    # The test binds loopback IPv4 only (CI containers may have no IPv6).
    text = re.sub(r"^\s*listen \[::\]:\d+[^;]*;\n", "", text, flags=re.MULTILINE)
    for old, new in replacements.items():
        assert old in text, f"deploy/nginx/{name} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


class Nginx:
    """nginx in the foreground with a private prefix: the shipped site, and the TLS variant."""

    def __init__(self, prefix: Path, upstream_port: int, tls: tuple[Path, Path] | None):
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        self.port = support.free_port()
        locations, headers = prefix / "har-webui-locations.conf", prefix / "har-webui-headers.conf"
        headers.write_text(render_site("har-webui-headers.conf", {}))
        locations.write_text(
            render_site(
                "har-webui-locations.conf",
                {
                    "/opt/har-flax/webui/static/": f"{support.REPO / 'webui' / 'static'}/",
                    "/etc/nginx/snippets/har-webui-headers.conf": str(headers),
                },
            )
        )
        include = {"/etc/nginx/snippets/har-webui-locations.conf": str(locations)}
        site = render_site(
            "har-webui.conf",
            {
                "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream_port};",
                "listen 80;": f"listen 127.0.0.1:{self.port};",
                **include,
            },
        )
        sites = [site]
        self.tls_port = self.redirect_port = None
        if tls is not None:
            cert, key = tls
            self.tls_port, self.redirect_port = support.free_port(), support.free_port()
            tls_site = render_site(
                "har-webui-tls.conf",
                {
                    "listen 443 ssl http2;": f"listen 127.0.0.1:{self.tls_port} ssl http2;",
                    "listen 80;": f"listen 127.0.0.1:{self.redirect_port};",
                    "/etc/letsencrypt/live/har.example.org/fullchain.pem": str(cert),
                    "/etc/letsencrypt/live/har.example.org/privkey.pem": str(key),
                    **include,
                },
            )
            # Both sites share one http block here; the upstream is defined once.
            tls_site, n = re.subn(r"upstream har_webui \{.*?\}\n", "", tls_site, flags=re.S)
            assert n == 1
            sites.append(tls_site)
        for i, text in enumerate(sites):
            (prefix / f"site{i}.conf").write_text(text)
        mime = "/etc/nginx/mime.types"
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""
            {"user root;" if os.geteuid() == 0 else ""}
            worker_processes 1;
            daemon off;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log info;
            events {{ worker_connections 64; }}
            http {{
                {f"include {mime};" if Path(mime).exists() else ""}
                default_type application/octet-stream;
                access_log {prefix}/access.log;
                client_body_temp_path {prefix}/client_body;
                proxy_temp_path {prefix}/proxy;
                fastcgi_temp_path {prefix}/fastcgi;
                uwsgi_temp_path {prefix}/uwsgi;
                scgi_temp_path {prefix}/scgi;
                {"".join(f"include {prefix}/site{i}.conf;" for i in range(len(sites)))}
            }}
            """
        )
        check = subprocess.run(
            [NGINX, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 20
        while not self._accepts(self.port):
            assert self.proc.poll() is None, (prefix / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not open its port"
            time.sleep(0.1)

    @staticmethod
    def _accepts(port: int) -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def stop(self) -> None:
        # SIGQUIT is nginx's graceful shutdown.
        support.stop_process(self.proc, sig=signal.SIGQUIT)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if OPENSSL is None:
        return None
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def nginx(gunicorn, tls_files, tmp_path_factory):
    if NGINX is None:
        pytest.skip("needs the Debian nginx package (.ci/run installs it)")
    upstream = int(gunicorn["url"].rsplit(":", 1)[1].strip("/"))
    server = Nginx(tmp_path_factory.mktemp("nginx"), upstream, tls_files)
    yield server
    server.stop()


# --------------------------------------------------------------------------- HTTP helpers


def request(url: str, *, data: bytes | None = None, headers=None, context=None):
    """(status, headers, body) for one request, including error statuses."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=context),
        _NoRedirect(),
    )
    try:
        with opener.open(req, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def multipart(files: list[tuple[str, bytes, str]]) -> tuple[bytes, dict]:
    boundary = "----har-stack-test"
    parts = []
    for name, data, content_type in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def predict(url: str, files: list[tuple[str, bytes, str]]):
    body, headers = multipart(files)
    return request(url + "predict", data=body, headers=headers)


# --------------------------------------------------------------------------- the stack


@needs_nginx
def test_a_photo_through_nginx_gunicorn_and_grpc(nginx, cat_jpeg):
    status, headers, body = predict(nginx.url, [("cat.jpg", cat_jpeg, "image/jpeg")])
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["model"]["kind"] == "imagenet"
    assert any(name in answer["action"] for name in CAT_CLASSES), answer["action"]
    assert answer["all_predictions"][0]["action"] == answer["action"]
    assert headers["X-Content-Type-Options"] == "nosniff"


@needs_nginx
def test_oversize_uploads_get_the_apps_json_413_from_nginx(nginx, gunicorn):
    # nginx and the app read request bodies up to the same 11 MiB (10 MiB of files plus 1 MiB
    # for the form), so nginx answers every larger body before Python reads a byte, with the
    # app's JSON.
    too_large = {
        "error": "Upload too large: the limit is 10 MiB for all files together; "
        "send a smaller photo or fewer frames",
        "code": "REQUEST_ENTITY_TOO_LARGE",
    }
    logged = len(gunicorn["log"].read_text())  # (other tests' requests went to it before)
    status, headers, body = predict(nginx.url, [("big.jpg", b"\xff" * (11 * MiB + 1000), "")])
    assert status == 413 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == too_large
    assert_app_security_headers(headers)
    assert '"POST /predict HTTP/1.1" 413' not in gunicorn["log"].read_text()[logged:]
    # Files just over 10 MiB in a body under 11 MiB: the app answers, the same JSON.
    status, headers, body = predict(nginx.url, [("big.jpg", b"\xff" * (10 * MiB + 1), "")])
    assert status == 413 and json.loads(body) == too_large
    # Just under the limit passes nginx and the app and reaches the model server, which
    # judges the bytes (not an image) rather than their size.
    status, headers, body = predict(nginx.url, [("big.jpg", b"\xff" * (10 * MiB - 50), "")])
    assert status == 400, body
    assert json.loads(body)["code"] == "INVALID_ARGUMENT"
    # gunicorn alone (no nginx) still refuses the oversized body, with the same JSON.
    status, headers, body = predict(gunicorn["url"], [("big.jpg", b"\xff" * (12 * MiB), "")])
    assert status == 413 and json.loads(body) == too_large


def test_the_upload_limits_of_app_and_nginx_agree():
    from webui import create_app, settings

    text = (DEPLOY / "nginx" / "har-webui-locations.conf").read_text()
    nginx_mib = int(re.search(r"client_max_body_size (\d+)m;", text).group(1))
    assert nginx_mib * MiB == settings.max_request_bytes(settings.DEFAULTS)
    # nginx's 413 body is the app's, word for word.
    app = create_app({"HAR_RATE_LIMIT_ENABLED": False})
    app_body = app.test_client().post("/predict", data=b"x" * (nginx_mib * MiB + 1)).get_json()
    nginx_body = json.loads(re.search(r"return 413 '(.*?)\\n';", text).group(1))
    assert nginx_body == app_body


def test_stop_timeouts_outlast_a_request_waiting_on_the_model_server():
    """gRPC deadline < gunicorn's graceful stop < systemd's stop timeout: a stop or reload lets a
    waiting request end with the app's answer, not nginx's 502."""
    from webui import settings

    # Read, not run: running the file would set PROMETHEUS_MULTIPROC_DIR in this process.
    conf = (DEPLOY / "gunicorn.conf.py").read_text()
    graceful_s = int(re.search(r"^graceful_timeout = (\d+)$", conf, re.MULTILINE).group(1))
    worker_s = int(re.search(r'"HAR_WEBUI_TIMEOUT", "(\d+)"', conf).group(1))
    unit = (DEPLOY / "systemd" / "har-webui.service").read_text()
    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))
    deadline_s = float(settings.DEFAULTS["HAR_GRPC_TIMEOUT_S"])
    assert deadline_s < graceful_s < stop_s
    assert deadline_s < worker_s


@needs_nginx
def test_api_errors_pass_through_nginx_as_the_apps_json(nginx):
    status, headers, body = predict(nginx.url, [("notes.txt", b"hello\n" * 100, "text/plain")])
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert "not an image" in json.loads(body)["error"]
    status, headers, body = request(nginx.url + "nope")
    assert status == 404 and json.loads(body)["error"].startswith("Not found")


@needs_nginx
def test_page_from_gunicorn_static_files_from_nginx_gzipped(nginx, gunicorn):
    status, headers, body = request(nginx.url)
    assert status == 200 and b"Recognize action" in body
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    status, headers, body = request(
        nginx.url + "static/app.js", headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == (support.REPO / "webui/static/app.js").read_bytes()
    assert_app_security_headers(headers)  # nginx's answer, with the app's headers
    assert headers["Cache-Control"] == "max-age=3600"  # nginx's `expires 1h`; the app says no-cache
    assert "/static/app.js" not in gunicorn["log"].read_text()
    assert "Strict-Transport-Security" not in headers  # plain HTTP


def assert_app_security_headers(headers) -> None:
    """Every header webui/security.py sends, with the app's value (nginx's answers too)."""
    from webui.security import HEADERS

    for name, value in HEADERS.items():
        assert headers.get(name) == value, (name, headers.get(name))


@needs_nginx
def test_health_is_public_metrics_are_not(nginx, gunicorn):
    status, _, body = request(nginx.url + "health")
    assert status == 200 and json.loads(body)["model_server"] == "SERVING"
    status, headers, body = request(nginx.url + "metrics")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert_app_security_headers(headers)
    status, _, body = request(gunicorn["url"] + "metrics")
    assert status == 200 and b"har_webui_http_requests_total" in body


def predict_count(metrics_text: str) -> float:
    pattern = (
        r'^har_webui_http_requests_total\{endpoint="/predict",method="POST",status="200"\} (\S+)$'
    )
    match = re.search(pattern, metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@needs_nginx
def test_metrics_add_up_over_all_gunicorn_workers(nginx, gunicorn, photos):
    before = predict_count(request(gunicorn["url"] + "metrics")[2].decode())
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        assert predict(nginx.url, [(f"{name}.jpg", photos[name], "image/jpeg")])[0] == 200
    text = request(gunicorn["url"] + "metrics")[2].decode()
    assert predict_count(text) - before == 4
    # Workers write their samples to files there and /metrics sums them, whichever worker
    # answers the scrape (without it each scrape would see one worker's counts).
    assert list(gunicorn["prometheus_dir"].glob("counter_*.db"))


@needs_nginx
def test_nginx_answers_json_when_the_web_ui_is_down(tmp_path):
    down = Nginx(tmp_path / "nginx-down", support.free_port(), None)
    try:
        status, headers, body = request(down.url + "health")
        assert status == 502 and headers["Content-Type"] == "application/json"
        assert "not running" in json.loads(body)["error"]
        assert_app_security_headers(headers)
    finally:
        down.stop()


@needs_nginx
@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command to make a test certificate")
def test_the_tls_site_serves_https_and_redirects_http(nginx, tls_files, cat_jpeg):
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    status, headers, body = request(f"https://localhost:{nginx.tls_port}/health", context=context)
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert headers["Strict-Transport-Security"].startswith("max-age=")
    body_bytes, form_headers = multipart([("cat.jpg", cat_jpeg, "image/jpeg")])
    status, _, body = request(
        f"https://localhost:{nginx.tls_port}/predict",
        data=body_bytes, headers=form_headers, context=context,
    )  # fmt: skip
    assert status == 200 and json.loads(body)["model"]["kind"] == "imagenet"
    # HSTS on what nginx answers itself too (a location with headers of its own inherits none).
    tls = f"https://localhost:{nginx.tls_port}/"
    too_big, too_big_headers = multipart([("big.jpg", b"x" * (12 * 2**20), "image/jpeg")])
    for status_wanted, url, kw in (
        (200, tls + "static/app.js", {}),
        (404, tls + "metrics", {}),
        (413, tls + "predict", {"data": too_big, "headers": too_big_headers}),
    ):
        status, headers, _ = request(url, context=context, **kw)
        assert status == status_wanted, url
        assert headers["Strict-Transport-Security"] == "max-age=63072000", url
        assert_app_security_headers(headers)
    status, headers, _ = request(f"http://127.0.0.1:{nginx.redirect_port}/some/page")
    assert status == 301 and headers["Location"].startswith("https://")


# --------------------------------------------------------------------------- monitoring


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "har-flax-dashboard.json").read_text())
    names = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Metric names: identifiers followed by a selector, a range or a closing paren.
            names |= set(re.findall(r"\b(har_[a-z_]+)\b", target["expr"]))
    return names


def exposed_names(text: str) -> set[str]:
    """Sample names in a /metrics page, including declared metrics with no samples yet."""
    names = {m.group(1) for m in re.finditer(r"^(har_[a-z_]+)[{ ]", text, re.MULTILINE)}
    for name, kind in re.findall(r"^# TYPE (har_[a-z_]+) (\w+)$", text, re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_the_dashboard_queries_only_metrics_that_exist(gunicorn, default_grpc, cat_jpeg):
    # One prediction, so every histogram has samples and is exposed.
    assert predict(gunicorn["url"], [("cat.jpg", cat_jpeg, "image/jpeg")])[0] == 200
    webui = request(gunicorn["url"] + "metrics")[2].decode()
    grpc_metrics = request(f"http://127.0.0.1:{default_grpc.metrics_port}/metrics")[2].decode()
    exposed = exposed_names(webui) | exposed_names(grpc_metrics)
    wanted = dashboard_metric_names()
    assert wanted - exposed == set(), "the dashboard queries metrics nobody exports"
    # The panels: request rate, error rate, latency percentiles, batch size, queue depth.
    titles = " ".join(
        p["title"].lower()
        for p in json.loads((DEPLOY / "grafana/har-flax-dashboard.json").read_text())["panels"]
    )
    for needed in ("request rate", "error rate", "latency percentiles", "batch size", "queue"):
        assert needed in titles


def test_prometheus_scrapes_where_the_services_listen():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    unit_webui = (DEPLOY / "systemd" / "har-webui.service").read_text()
    unit_grpc = (DEPLOY / "systemd" / "har-grpc.service").read_text()
    assert f"HAR_WEBUI_BIND={targets['har-webui']}" in unit_webui
    assert f"HAR_SERVE_METRICS_PORT={targets['har-grpc'].rsplit(':', 1)[1]}" in unit_grpc
    assert f"--metrics-port {targets['har-grpc'].rsplit(':', 1)[1]}" in (
        (DEPLOY / "Procfile").read_text()
    )


# --------------------------------------------------------------------------- make serve


def start_serve_all(model: Path, log_path: Path, env: dict[str, str]):
    """scripts/serve_all.py on free ports, started from outside the repository with a model
    path relative to where it is started; waits for "ready".

    Returns:
      (the process, the web UI's URL, the gRPC port, the children's process ids).
    """
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(support.REPO / "scripts/serve_all.py"), "--model", model.name,
             "--port", "0", "--grpc-port", "0", "--timeout", "240"],
            cwd=model.parent, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while True:
        text = log_path.read_text(errors="replace")
        match = re.search(r"har-flax is ready: open (http://\S+) in a browser", text)
        if match:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            support.stop_process(proc)
            pytest.fail(f"serve_all did not get ready:\n{text}")
        time.sleep(0.3)
    grpc_port = int(re.search(r"\[grpc\] .*listening on \S+:(\d+)", text).group(1))
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return proc, match.group(1), grpc_port, [int(pid) for pid in children]


def assert_gone(url: str, grpc_port: int, pids: list[int]) -> None:
    """Neither server answers any more, and neither process is left."""
    for port in (int(url.rsplit(":", 1)[1].strip("/")), grpc_port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        with pytest.raises(OSError):
            conn.request("GET", "/")
        conn.close()
    assert not [pid for pid in pids if alive(pid)], "a server is still running"


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not reaped yet, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][0] != "Z"
    except FileNotFoundError:
        return False


def kill_leftovers(pids: list[int]) -> None:
    """SIGKILLs the test's own serve_all children that outlived it (a failed test)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_serve_all_starts_both_prints_the_url_and_stops_both_on_ctrl_c(tmp_path_factory, tmp_path):
    """Behind a proxy that cannot reach this machine (no no_proxy for 127.0.0.1), as a shell at
    work may be: found in review, the health checks of serve_all and the web UI's calls to the
    model server went to the proxy, and `make serve` never got ready."""
    model = support.tiny_model_dir(tmp_path_factory)
    log_path = tmp_path / "serve_all.log"
    proc, url, grpc_port, pids = start_serve_all(
        model, log_path, support.proxy_env(support.DEAD_PROXY)
    )
    try:
        status, _, body = request(url + "classes")
        assert status == 200 and json.loads(body)["classes"] == list(support.TINY_CLASSES)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in `make serve` sends
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        support.stop_process(proc)
        kill_leftovers(pids)
    assert "serve_all: stopped" in log_path.read_text()
    assert_gone(url, grpc_port, pids)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["SIGHUP", "SIGKILL"])
def test_serve_all_leaves_no_server_behind_when_its_terminal_closes_or_it_is_killed(
    tmp_path_factory, tmp_path, sig
):
    """Found in review: closing the terminal (SIGHUP) ended serve_all without its cleanup, and
    the servers (in sessions of their own) kept ports 8080 and 50051: the next `make serve`
    failed with "address in use". SIGHUP now stops both as Ctrl-C does; if serve_all is killed
    outright, the kernel sends each of them SIGTERM (Linux's parent-death signal)."""
    model = support.tiny_model_dir(tmp_path_factory)
    log_path = tmp_path / "serve_all.log"
    proc, url, grpc_port, pids = start_serve_all(model, log_path, support.env_without_proxies())
    try:
        assert len(pids) == 2, pids
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        if sig == signal.SIGHUP:
            assert code == 0, log_path.read_text()
            assert "serve_all: stopped" in log_path.read_text()
        deadline = time.monotonic() + 30  # after SIGKILL the servers stop on their own
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_gone(url, grpc_port, pids)
    finally:
        support.stop_process(proc)
        kill_leftovers(pids)
