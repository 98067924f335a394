"""The chat web server: a Flask app factory with Flask-SocketIO for streaming."""

import logging
from datetime import timedelta
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from . import auth, events, pages, session_routes  # noqa: F401  (importing events registers its handlers)
from .accounts import Accounts, load_or_create_secret_key
from .errors import WebUIError, internal_error
from .rooms import socketio
from .store import SessionStore
from .worker import GenerationWorker

log = logging.getLogger(__name__)


def create_app(config: dict | None = None, model=None) -> Flask:
    """The app serving sessions from config["SESSIONS_DIR"]; `model` is a loaded engine model, or None
    for a server that manages sessions without writing replies."""
    app = Flask(__name__)
    app.config.from_mapping(
        SESSIONS_DIR="sessions",
        AUTH=False,
        ALLOW_REGISTER=False,
        CHECKPOINT_SECONDS=2.0,
        MAX_CONTENT_LENGTH=16 * 1024 * 1024,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(days=30),
    )
    app.config.update(config or {})

    sessions_dir = Path(app.config["SESSIONS_DIR"])
    store = SessionStore(sessions_dir)
    # Dot names cannot clash with user folders, whose names start with a letter or digit.
    app.secret_key = load_or_create_secret_key(sessions_dir / ".secret_key")
    app.extensions["session_store"] = store
    app.extensions["accounts"] = Accounts(sessions_dir / ".users.json")
    app.extensions["model"] = model
    app.extensions["generation_worker"] = (
        GenerationWorker(model, store, app.config["CHECKPOINT_SECONDS"]) if model is not None else None
    )
    app.register_blueprint(auth.bp)
    app.register_blueprint(session_routes.bp)
    app.register_blueprint(pages.bp)
    app.register_error_handler(WebUIError, _webui_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    socketio.init_app(app, async_mode="threading")
    return app


def _webui_error(error: WebUIError):
    return jsonify(error=error.to_dict()), error.status


def _http_error(error: HTTPException):
    if error.code == 413:
        return _webui_error(WebUIError("too_large", "The request is too large."))
    code = {401: "login_required", 404: "not_found"}.get(error.code, "bad_request")
    message = {404: f"There is nothing at {request.path}."}.get(error.code, error.description)
    return jsonify(error={"code": code, "message": message}), error.code


def _unexpected_error(error: Exception):
    log.exception("request %s %s failed", request.method, request.path, exc_info=error)
    return _webui_error(internal_error())
