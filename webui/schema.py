"""The session document: its defaults, its size caps, and the checks every document passes before it is
stored, whether it comes from a user's change, an import, or a file read back from disk.

A session file looks like this (schema 1):
    {"schema": 1, "id": "<32 hex>", "title": str, "created": iso, "updated": iso, "revision": int,
     "participants": [{"name", "persona", "is_user", optional "adapter"}],
     "fixed_prompt": str, "keep_fixed_prompt": bool,
     "settings": {samplers..., "max_reply_tokens", "end_on_newline", "prompt_format", "adapter"},
     "messages": [{"id", "author", "is_user", "chosen",
                   "swipes": [{"text", "time", "tokens", "tokens_per_second"}]}]}
Each message keeps its alternatives (swipes) with their own text and statistics; `chosen` picks the one
shown and sent to the model.
"""

import re
import uuid
from datetime import datetime, timezone

SCHEMA_VERSION = 1

# Caps on what a user may send; they keep one request from filling the disk or the model's context.
MAX_TITLE = 200
MAX_NAME = 40
MAX_PERSONA = 4_000
MAX_FIXED_PROMPT = 20_000
MAX_MESSAGE = 20_000
MAX_PARTICIPANTS = 12
MAX_SWIPES = 100
MAX_ADAPTER_NAME = 64

SESSION_ID = re.compile(r"[0-9a-f]{32}")
MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Names appear as "Name: text" lines, so a colon or a line break would make the transcript ambiguous.
PARTICIPANT_NAME = re.compile(r"[^:\n\r]+")

PROMPT_FORMATS = ("roleplay", "chat_template")

# Every generation setting: (type, lowest, highest, default). The sampler names match the engine's
# SamplingSettings fields, so the settings dict passes straight to SamplingSettings.from_dict.
SETTINGS = {
    "temperature": (float, 0.0, 5.0, 0.8),
    "top_k": (int, 0, 1000, 50),
    "top_p": (float, 0.0, 1.0, 0.9),
    "min_p": (float, 0.0, 1.0, 0.0),
    "typical": (float, 0.0, 1.0, 1.0),
    "repetition_penalty": (float, 0.5, 3.0, 1.1),
    "repetition_sustain": (int, 0, 65536, 256),
    "repetition_decay": (int, 0, 65536, 128),
    "frequency_penalty": (float, -2.0, 2.0, 0.0),
    "presence_penalty": (float, -2.0, 2.0, 0.0),
    "seed": (int, 0, 2**63 - 1, None),
    "max_reply_tokens": (int, 1, 4096, 300),
    "end_on_newline": (bool, None, None, False),
    "prompt_format": (str, None, None, "roleplay"),
    # The LoRA adapter bots speak with unless their participant names another; None is the base model.
    # Only the form is checked here: which adapters exist depends on the server's --lora options.
    "adapter": (str, None, None, None),
}


class SchemaError(ValueError):
    """Input that does not fit the session document; the message says which field and why."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_message_id() -> str:
    return uuid.uuid4().hex[:12]


def default_settings() -> dict:
    return {name: spec[3] for name, spec in SETTINGS.items()}


def new_session(title: str = "New chat") -> dict:
    """A fresh session with one user and one bot; the store gives it an id and a revision."""
    stamp = now()
    return {
        "schema": SCHEMA_VERSION,
        "id": None,
        "title": title,
        "created": stamp,
        "updated": stamp,
        "revision": 0,
        "participants": [
            {"name": "You", "persona": "", "is_user": True},
            {"name": "Assistant", "persona": "Assistant is a helpful, friendly AI.", "is_user": False},
        ],
        "fixed_prompt": "This is a conversation between You and Assistant.",
        "keep_fixed_prompt": True,
        "settings": default_settings(),
        "messages": [],
    }


def check_text(value, field: str, cap: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{field} must be text.")
    if len(value) > cap:
        raise SchemaError(f"{field} is too long ({len(value)} characters; the limit is {cap}).")
    if not allow_empty and not value.strip():
        raise SchemaError(f"{field} must not be empty.")
    return value


def check_title(value) -> str:
    return check_text(value, "The title", MAX_TITLE, allow_empty=False).strip()


def check_participants(value) -> list[dict]:
    """Exactly one user and at least one bot, each with a unique name usable as a `Name:` prefix."""
    if not isinstance(value, list) or not value:
        raise SchemaError("Participants must be a non-empty list.")
    if len(value) > MAX_PARTICIPANTS:
        raise SchemaError(f"A session can have at most {MAX_PARTICIPANTS} participants.")
    participants, seen = [], set()
    for entry in value:
        if not isinstance(entry, dict) or set(entry) - {"name", "persona", "is_user", "adapter"}:
            raise SchemaError("Each participant must be an object with name, persona, is_user and an optional adapter.")
        name = check_text(entry.get("name"), "A participant's name", MAX_NAME, allow_empty=False).strip()
        if not PARTICIPANT_NAME.fullmatch(name):
            raise SchemaError(f"The name {name!r} must not contain a colon or a line break.")
        if name.casefold() in seen:
            raise SchemaError(f"Two participants are named {name!r}; names must differ.")
        seen.add(name.casefold())
        persona = check_text(entry.get("persona", ""), f"The persona of {name}", MAX_PERSONA)
        is_user = entry.get("is_user", False)
        if not isinstance(is_user, bool):
            raise SchemaError(f"is_user of {name} must be true or false.")
        participant = {"name": name, "persona": persona, "is_user": is_user}
        # Stored only when set, so that files written before adapters existed read back unchanged.
        adapter = check_adapter(entry.get("adapter"), f"The adapter of {name}")
        if adapter is not None:
            participant["adapter"] = adapter
        participants.append(participant)
    if sum(p["is_user"] for p in participants) != 1:
        raise SchemaError("Exactly one participant must be the user (is_user: true).")
    return participants


def check_adapter(value, field: str) -> str | None:
    """A LoRA adapter's name, or None for the default."""
    if value is None:
        return None
    return check_text(value, field, MAX_ADAPTER_NAME, allow_empty=False)


def check_settings(value, base: dict | None = None) -> dict:
    """Merge `value` over `base` (defaults when None) and check every setting's type and range."""
    if not isinstance(value, dict):
        raise SchemaError("Settings must be an object.")
    unknown = set(value) - set(SETTINGS)
    if unknown:
        raise SchemaError(f"Unknown setting {sorted(unknown)[0]!r}.")
    settings = dict(base or default_settings())
    for name, raw in value.items():
        kind, low, high, default = SETTINGS[name]
        settings[name] = _check_setting(name, raw, kind, low, high, default)
    return settings


def _check_setting(name, raw, kind, low, high, default):
    if raw is None and default is None:
        return None
    if kind is bool:
        if not isinstance(raw, bool):
            raise SchemaError(f"Setting {name} must be true or false.")
        return raw
    if name == "adapter":
        return check_adapter(raw, "Setting adapter")
    if kind is str:
        if raw not in PROMPT_FORMATS:
            raise SchemaError(f"Setting {name} must be one of {', '.join(PROMPT_FORMATS)}.")
        return raw
    # JSON has one number type; bool is an int in Python but never a valid number here.
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (kind is int and not float(raw).is_integer()):
        raise SchemaError(f"Setting {name} must be {'a whole number' if kind is int else 'a number'}.")
    if not low <= raw <= high:
        raise SchemaError(f"Setting {name} must be between {low} and {high}.")
    return kind(raw)


def check_consistency(doc: dict) -> None:
    """Rules that tie fields together; checked after every change."""
    bots = [p for p in doc["participants"] if not p["is_user"]]
    if doc["settings"]["prompt_format"] == "chat_template" and len(bots) != 1:
        raise SchemaError(
            "The chat template format works with exactly one bot; switch to the roleplay format for several bots."
        )


def check_session(doc) -> dict:
    """Check a whole document (a file read back, or an import) and return it with settings completed."""
    if not isinstance(doc, dict):
        raise SchemaError("A session must be a JSON object.")
    version = doc.get("schema")
    if version != SCHEMA_VERSION:
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise SchemaError(f"The session uses schema {version}, made by a newer version of this server.")
        raise SchemaError(f"The session has schema {version!r}; this server reads schema {SCHEMA_VERSION}.")
    expected = {"schema", "id", "title", "created", "updated", "revision", "participants",
                "fixed_prompt", "keep_fixed_prompt", "settings", "messages"}
    missing, unknown = expected - set(doc), set(doc) - expected
    if missing or unknown:
        problem = f"lacks {sorted(missing)[0]!r}" if missing else f"has an unknown field {sorted(unknown)[0]!r}"
        raise SchemaError(f"The session {problem}.")
    if doc["id"] is not None and not (isinstance(doc["id"], str) and SESSION_ID.fullmatch(doc["id"])):
        raise SchemaError("The session id must be 32 hexadecimal digits.")
    checked = dict(doc)
    checked["title"] = check_title(doc["title"])
    for stamp in ("created", "updated"):
        check_text(doc[stamp], stamp, 40)
    if isinstance(doc["revision"], bool) or not isinstance(doc["revision"], int) or doc["revision"] < 0:
        raise SchemaError("The revision must be a whole number of at least 0.")
    checked["participants"] = check_participants(doc["participants"])
    checked["fixed_prompt"] = check_text(doc["fixed_prompt"], "The fixed prompt", MAX_FIXED_PROMPT)
    if not isinstance(doc["keep_fixed_prompt"], bool):
        raise SchemaError("keep_fixed_prompt must be true or false.")
    checked["settings"] = check_settings(doc["settings"])
    checked["messages"] = _check_messages(doc["messages"])
    check_consistency(checked)
    return checked


def _check_messages(value) -> list[dict]:
    if not isinstance(value, list):
        raise SchemaError("messages must be a list.")
    ids = set()
    for message in value:
        if not isinstance(message, dict) or set(message) != {"id", "author", "is_user", "chosen", "swipes"}:
            raise SchemaError("Each message must have exactly id, author, is_user, chosen and swipes.")
        if not isinstance(message["id"], str) or not MESSAGE_ID.fullmatch(message["id"]) or message["id"] in ids:
            raise SchemaError(f"Message id {message['id']!r} is malformed or used twice.")
        ids.add(message["id"])
        check_text(message["author"], "A message's author", MAX_NAME, allow_empty=False)
        if not isinstance(message["is_user"], bool):
            raise SchemaError("A message's is_user must be true or false.")
        swipes = message["swipes"]
        if not isinstance(swipes, list) or not 1 <= len(swipes) <= MAX_SWIPES:
            raise SchemaError(f"A message must have between 1 and {MAX_SWIPES} swipes.")
        for swipe in swipes:
            _check_swipe(swipe)
        chosen = message["chosen"]
        if isinstance(chosen, bool) or not isinstance(chosen, int) or not 0 <= chosen < len(swipes):
            raise SchemaError(f"Message {message['id']} chooses a swipe that does not exist.")
    return value


def _check_swipe(swipe) -> None:
    # Stored text has no length cap: a reply extended by "continue" may outgrow what a user can type,
    # and a file the server wrote itself must always read back.
    if not isinstance(swipe, dict) or set(swipe) != {"text", "time", "tokens", "tokens_per_second"}:
        raise SchemaError("Each swipe must have exactly text, time, tokens and tokens_per_second.")
    if not isinstance(swipe["text"], str) or not isinstance(swipe["time"], str):
        raise SchemaError("A swipe's text and time must be text.")
    for field in ("tokens", "tokens_per_second"):
        number = swipe[field]
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0):
            raise SchemaError(f"A swipe's {field} must be a non-negative number or null.")
