"""Reading fields out of untrusted request bodies and socket events; anything malformed becomes a
`bad_request` error naming the field, never an exception that reaches the client as a stack trace."""

from flask import request

from . import schema
from .errors import WebUIError
from .store import check_session_id


def json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise WebUIError("bad_request", "Send a JSON object with Content-Type: application/json.")
    return body


def as_object(payload) -> dict:
    if not isinstance(payload, dict):
        raise WebUIError("bad_request", "The event needs one JSON object as its argument.")
    return payload


def session_id(payload: dict) -> str:
    return check_session_id(payload.get("session_id"))


def revision(payload: dict) -> int:
    value = payload.get("revision")
    if isinstance(value, bool) or not isinstance(value, int):
        raise WebUIError("bad_request", "Every change must carry the session revision it was based on.")
    return value


def message_id(payload: dict) -> str:
    value = payload.get("message_id")
    if not isinstance(value, str) or not schema.MESSAGE_ID.fullmatch(value):
        raise WebUIError("bad_request", "message_id must name a message of this session.")
    return value


def whole_number(payload: dict, name: str) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WebUIError("bad_request", f"{name} must be a whole number.")
    return value


def text(payload: dict, name: str, cap: int, allow_empty: bool = False, default: str | None = None) -> str:
    value = payload.get(name, default)
    if isinstance(value, str) and len(value) > cap:
        raise WebUIError("too_large", f"{name} is too long ({len(value)} characters; the limit is {cap}).")
    try:
        return schema.check_text(value, name, cap, allow_empty)
    except schema.SchemaError as exc:
        raise WebUIError("bad_request", str(exc)) from exc


def optional_name(payload: dict, name: str) -> str | None:
    value = payload.get(name)
    return None if value is None else text(payload, name, schema.MAX_NAME).strip()
