"""HTTP routes for managing sessions: list, create, read, set up, delete, duplicate, branch, export and
import. Chatting inside a session happens over Socket.IO (events.py). Every route acts for the logged-in
user only: another user's session id is simply not found in this user's folder."""

import json

from flask import Blueprint, Response, g, jsonify, request

from . import operations, payload, schema
from .auth import require_user
from .changes import commit, refuse_if_busy
from .errors import WebUIError
from .rooms import broadcast
from .store import current_store

bp = Blueprint("sessions", __name__, url_prefix="/api/sessions")

# An import is one JSON body; this caps it below the app's overall request limit with a clearer message.
MAX_IMPORT_BYTES = 8 * 1024 * 1024


@bp.before_request
def load_user():
    g.user = require_user()


@bp.get("")
def list_sessions():
    return jsonify(sessions=current_store().list(g.user))


@bp.post("")
def create_session():
    """A new session; the body may set any of title, participants, fixed_prompt, keep_fixed_prompt and
    settings, the rest takes defaults."""
    body = payload.json_body()
    doc = schema.new_session()
    operations.set_up(doc, body)
    return jsonify(session=current_store().create(g.user, doc)), 201


@bp.get("/<session_id>")
def get_session(session_id):
    return jsonify(session=current_store().load(g.user, session_id))


@bp.patch("/<session_id>")
def set_up_session(session_id):
    body = payload.json_body()
    revision = payload.revision(body)
    fields = {name: value for name, value in body.items() if name != "revision"}
    doc = commit(g.user, session_id, revision, lambda stored: operations.set_up(stored, fields))
    return jsonify(session=doc)


@bp.delete("/<session_id>")
def delete_session(session_id):
    revision = request.args.get("revision", type=int)
    refuse_if_busy(g.user, session_id)
    current_store().delete(g.user, session_id, revision)
    broadcast("session_deleted", {"session_id": session_id, "revision": revision}, g.user, session_id)
    return jsonify(deleted=session_id)


@bp.post("/<session_id>/duplicate")
def duplicate_session(session_id):
    doc = operations.duplicate(current_store().load(g.user, session_id))
    return jsonify(session=current_store().create(g.user, doc)), 201


@bp.post("/<session_id>/branch")
def branch_session(session_id):
    """A new session holding this one's messages up to and including `message_id`."""
    message_id = payload.message_id(payload.json_body())
    doc = operations.branch(current_store().load(g.user, session_id), message_id)
    return jsonify(session=current_store().create(g.user, doc)), 201


@bp.get("/<session_id>/export")
def export_session(session_id):
    doc = current_store().load(g.user, session_id)
    return Response(
        json.dumps(doc, ensure_ascii=False, indent=1),
        mimetype="application/json",
        headers={"Content-Disposition": f'attachment; filename="session-{session_id}.json"'},
    )


@bp.post("/import")
def import_session():
    """Store an exported session under a new id, after checking it as strictly as a file read from disk."""
    if request.content_length is not None and request.content_length > MAX_IMPORT_BYTES:
        raise WebUIError("too_large", f"An import may be at most {MAX_IMPORT_BYTES // (1024 * 1024)} MB.")
    try:
        doc = schema.check_session(payload.json_body())
    except schema.SchemaError as exc:
        raise WebUIError("bad_request", f"That is not a session export: {exc}") from exc
    doc["created"] = schema.now()
    return jsonify(session=current_store().create(g.user, doc)), 201
