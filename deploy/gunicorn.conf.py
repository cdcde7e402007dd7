"""gunicorn settings for the web UI: `gunicorn -c deploy/gunicorn.conf.py` (app included).

Every value can be changed without editing this file through the HAR_WEBUI_* variables below;
the app itself reads HAR_* (webui/settings.py). nginx sits in front (deploy/nginx/).
"""

import os
import shutil
import tempfile

wsgi_app = "webui:create_app()"

# nginx proxies to this address; keep it on loopback so clients cannot bypass nginx.
bind = os.environ.get("HAR_WEBUI_BIND", "127.0.0.1:8000")
# The app only waits on gRPC, so a few processes with several threads each go a long way;
# the model's compute lives in the gRPC server.
workers = int(os.environ.get("HAR_WEBUI_WORKERS", min(4, 2 * (os.cpu_count() or 1) + 1)))
worker_class = "gthread"
threads = int(os.environ.get("HAR_WEBUI_THREADS", "8"))
# Longer than the app's own gRPC deadline (HAR_GRPC_TIMEOUT_S, 30 s), so a slow model answers
# with a JSON 504 from the app rather than a killed worker.
timeout = int(os.environ.get("HAR_WEBUI_TIMEOUT", "60"))
# At a stop or reload, a request may still be waiting up to that 30 s deadline: let it end
# (its JSON 504 included) rather than cut it off with nginx's 502. har-webui.service allows 45 s.
graceful_timeout = 35
keepalive = 5
# Import once in the master, then fork: workers start fast and share memory. Safe because the
# gRPC channel is created lazily, in each worker, on its first request. So a reload (HUP) forks
# new workers from the code already imported: a new version needs a restart.
preload_app = True
# X-Forwarded-* from nginx on the same host are trusted (the app also needs
# HAR_TRUSTED_PROXIES=1 for per-client rate limits).
forwarded_allow_ips = os.environ.get("HAR_WEBUI_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
proxy_allow_ips = forwarded_allow_ips
accesslog = os.environ.get("HAR_WEBUI_ACCESS_LOG", "-")
errorlog = "-"
loglevel = os.environ.get("HAR_WEBUI_LOG_LEVEL", "info")

# Prometheus: with several workers, each writes its samples to files in this folder and
# /metrics adds them up. It must be set, and exist, before prometheus_client is imported (the
# app is preloaded right after this file runs), and be emptied at every start (files left by
# an earlier run would count twice).
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), "har-webui-prometheus")
)
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def on_starting(server):
    # After the preload, before any worker exists: only the master's (empty) files are lost.
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
