"""Socket.IO events: everything a browser does inside a chat.

Every client event takes one JSON object. Its handler answers with an acknowledgement, {"ok": true, ...}
or {"ok": false, "error": {...}}, and a refusal also arrives as a `chat_error` event, so a client may use
either. Changes carry the revision they were based on. The README's protocol section describes each event."""

import logging

from flask_socketio import emit, join_room, leave_room, rooms

from . import operations, payload, schema
from .auth import current_user, require_user
from .changes import commit, current
from .errors import WebUIError, internal_error
from .rooms import ROOM_PREFIX, room_of, socketio
from .store import current_store
from .worker import Job, current_worker, job_for_message

log = logging.getLogger(__name__)

# The most alternatives one regenerate writes at once: each has its own cache for the tokens it writes, and
# up to about 16 a decode step costs little more than one sample's.
MAX_SWIPES_AT_ONCE = 16


def client_event(name: str):
    """Register `handler(user, data) -> dict` for event `name`, with the checks and the error reporting
    that every event shares: no stack trace ever reaches a client."""

    def register(handler):
        def handle(*args):
            try:
                if len(args) != 1:
                    raise WebUIError("bad_request", f"The {name} event takes exactly one JSON object.")
                return {"ok": True, **handler(require_user(), payload.as_object(args[0]))}
            except WebUIError as exc:
                error = exc
            except Exception:
                log.exception("socket event %s failed", name)
                error = internal_error()
            report = {**error.to_dict(), "event": name, **_echo(args)}
            emit("chat_error", report)
            return {"ok": False, "error": report}

        socketio.on_event(name, handle)
        return handler

    return register


def _echo(args) -> dict:
    """The fields of a refused event that tell the client which of its requests failed."""
    data = args[0] if len(args) == 1 and isinstance(args[0], dict) else {}
    echoed = {}
    request_id = data.get("request_id")
    if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) and len(str(request_id)) <= 64:
        echoed["request_id"] = request_id
    session_id = data.get("session_id")
    if isinstance(session_id, str) and schema.SESSION_ID.fullmatch(session_id):
        echoed["session_id"] = session_id
    return echoed


@socketio.on("connect")
def connect(auth=None):
    if current_user() is None:
        raise ConnectionRefusedError("Log in first.")


@socketio.on("*")
def unknown_event(name, *args):
    emit("chat_error", {"code": "bad_request", "message": f"There is no event named {name!r}.", "event": name})


@client_event("join")
def join(user, data):
    """Watch a session: leave the one watched before, get a snapshot, then every broadcast after it."""
    session_id = payload.session_id(data)
    current_store().load(user, session_id)  # missing, someone else's, or damaged: refused here
    room = room_of(user, session_id)
    for joined in rooms():
        if joined.startswith(ROOM_PREFIX) and joined != room:
            leave_room(joined)

    def send_snapshot(state):
        join_room(room)
        doc = state["doc"] if state and state["doc"] else current_store().load(user, session_id)
        emit("snapshot", {"session_id": session_id, "revision": doc["revision"], "session": doc,
                          "job": state["job"] if state else None})
        return doc["revision"]

    worker = current_worker()
    revision = worker.with_live_state(user, session_id, send_snapshot) if worker else send_snapshot(None)
    return {"session_id": session_id, "revision": revision}


@client_event("send")
def send(user, data):
    """A user message (optional: empty text lets the bots go on), answered by `next_speaker` if named,
    else by the only bot, else by a multibot round."""
    session_id, revision = payload.session_id(data), payload.revision(data)
    text = payload.text(data, "text", schema.MAX_MESSAGE, allow_empty=True, default="")
    next_speaker = payload.optional_name(data, "next_speaker")
    doc = current(user, session_id, revision)
    worker = _require_worker()
    job = job_for_message(user, doc, next_speaker)
    if text.strip():
        doc = commit(user, session_id, revision,
                     lambda stored: operations.add_message(stored, operations.user_name(stored), True, text))
        job.revision = doc["revision"]
    return _queue(worker, job)


@client_event("regenerate")
def regenerate(user, data):
    """New alternatives for the last reply, `count` of them at once (default 1), kept beside the earlier ones."""
    count = payload.whole_number(data, "count") if "count" in data else 1
    if not 1 <= count <= MAX_SWIPES_AT_ONCE:
        raise WebUIError("bad_request", f"count must be 1 to {MAX_SWIPES_AT_ONCE}.")
    return _rework_last_reply(user, data, "regenerate", count)


@client_event("continue")
def continue_reply(user, data):
    """More of the last reply, e.g. after it was cut off by max reply tokens or stopped."""
    return _rework_last_reply(user, data, "continue")


@client_event("stop")
def stop(user, data):
    session_id = payload.session_id(data)
    current_store().load(user, session_id)
    worker = current_worker()
    return {"stopped": worker is not None and worker.stop(user, session_id)}


@client_event("choose_swipe")
def choose_swipe(user, data):
    message_id, swipe = payload.message_id(data), payload.whole_number(data, "swipe")
    return _change(user, data, lambda doc: operations.choose_swipe(doc, message_id, swipe))


@client_event("edit_message")
def edit_message(user, data):
    message_id = payload.message_id(data)
    text = payload.text(data, "text", schema.MAX_MESSAGE)
    return _change(user, data, lambda doc: operations.edit_message(doc, message_id, text))


@client_event("delete_message")
def delete_message(user, data):
    message_id = payload.message_id(data)
    return _change(user, data, lambda doc: operations.delete_message(doc, message_id))


@client_event("rewind")
def rewind(user, data):
    message_id = payload.message_id(data)
    return _change(user, data, lambda doc: operations.rewind(doc, message_id))


def _change(user, data, change) -> dict:
    doc = commit(user, payload.session_id(data), payload.revision(data), change)
    return {"session_id": doc["id"], "revision": doc["revision"]}


def _rework_last_reply(user, data, kind: str, count: int = 1) -> dict:
    session_id, revision = payload.session_id(data), payload.revision(data)
    doc = current(user, session_id, revision)
    worker = _require_worker()
    target = operations.last_bot_message(doc)
    if kind == "regenerate":
        operations.check_room_for_swipes(target, count)
    return _queue(worker, Job(user, session_id, kind, doc["revision"], message_id=target["id"], count=count))


def _queue(worker, job: Job) -> dict:
    ahead = worker.submit(job)
    return {"session_id": job.session_id, "revision": job.revision, "job_id": job.id, "ahead": ahead,
            "message_id": job.message_id}


def _require_worker():
    worker = current_worker()
    if worker is None:
        raise WebUIError("no_model", "This server runs without a model; restart it with one to get replies.")
    return worker
