"""The page a person uses: GET / (the app itself is static/app.js talking to the JSON API)."""

from __future__ import annotations

import flask

bp = flask.Blueprint("pages", __name__)


@bp.get("/")
def index():
    """The upload page. Model name and classes are fetched by the script from /classes, so the
    page itself renders even when the model server is down (and says so)."""
    max_bytes = flask.current_app.config["MAX_CONTENT_LENGTH"]
    return flask.render_template(
        "index.html",
        max_upload_bytes=max_bytes,
        max_upload_mb=flask.current_app.config["HAR_MAX_UPLOAD_MB"],
    )
