"""gunicorn settings for the web UI: `gunicorn -c deploy/gunicorn.conf.py` (app included).

Every value can be changed without editing this file through the HAR_WEBUI_* variables below;
the app itself reads HAR_* (webui/settings.py). nginx sits in front (deploy/nginx/).
"""

import logging
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
# gunicorn 25.1+ opens a control socket for gunicornc in $XDG_RUNTIME_DIR or ~/.gunicorn: under
# har-webui.service that home is read-only (an ERROR at every start), and two instances of one
# user would share the socket. systemd's signals do what it offers (older gunicorns ignore it).
control_socket_disable = True

# Prometheus: with several workers, each writes its samples to files in this folder and
# /metrics adds them up. It must be set, and exist, before prometheus_client is imported (the
# app is preloaded right after this file runs), and be emptied at every start (files left by
# an earlier run would count twice). har-webui.service sets it (under /run); otherwise each
# instance gets a folder of its own, removed when it stops: a shared default folder would be
# emptied by the next instance's start, taking the running one's counts with it.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="har-webui-prometheus-")
    os.environ["HAR_WEBUI_OWN_PROMETHEUS_DIR"] = "1"  # remove it at exit (on_exit)
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def _app_logs_like_gunicorn(server):
    """The app's own lines (webui.*: the model server down, a bad token) go where gunicorn's
    error log goes, with its time, pid and level; without this they reached stderr bare, and
    INFO lines not at all."""
    app_log = logging.getLogger("webui")
    app_log.handlers[:] = server.log.error_log.handlers
    app_log.setLevel(server.log.error_log.level)
    app_log.propagate = False


def on_starting(server):
    _app_logs_like_gunicorn(server)
    # After the preload, before any worker exists: only the master's (empty) files are lost.
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def on_reload(server):
    _app_logs_like_gunicorn(server)  # a reload (HUP) replaces gunicorn's handlers


def on_exit(server):
    if os.environ.get("HAR_WEBUI_OWN_PROMETHEUS_DIR"):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
