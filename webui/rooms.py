"""The Socket.IO server object and what goes out to a session's room. Each session is a room named by its
owner and id, so every tab showing it, and a page reloaded mid-reply, hears the same broadcasts."""

from flask_socketio import SocketIO

socketio = SocketIO()

ROOM_PREFIX = "session:"


def room_of(user: str, session_id: str) -> str:
    return f"{ROOM_PREFIX}{user}/{session_id}"


def broadcast(event: str, data: dict, user: str, session_id: str) -> None:
    socketio.emit(event, data, to=room_of(user, session_id))


def broadcast_session(user: str, doc: dict) -> None:
    data = {"session_id": doc["id"], "revision": doc["revision"], "session": doc}
    broadcast("session_updated", data, user, doc["id"])
