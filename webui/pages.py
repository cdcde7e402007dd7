"""The page a person uses: GET / (the app itself is static/app.js talking to the JSON API)."""

from __future__ import annotations

import flask

from webui import settings

bp = flask.Blueprint("pages", __name__)


@bp.get("/")
def index():
    """The upload page. Model name and classes are fetched by the script from /classes, so the
    page itself renders even when the model server is down (and says so)."""
    config = flask.current_app.config
    return flask.render_template(
        "index.html",
        # The files' own limit (the request body may be larger by the form's framing).
        max_upload_bytes=settings.max_upload_bytes(config),
        max_upload_mb=config["HAR_MAX_UPLOAD_MB"],
    )
