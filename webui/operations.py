"""Changes to a session document that users ask for: messages, swipes, rewinding, branching and the
session's setup. Each takes the document and changes it in place, or raises a WebUIError that says
why the change makes no sense; the store decides whether it may be saved."""

import copy

from . import schema
from .errors import WebUIError


def text_of(message: dict) -> str:
    return message["swipes"][message["chosen"]]["text"]


def index_of(doc: dict, message_id: str) -> int:
    for index, message in enumerate(doc["messages"]):
        if message["id"] == message_id:
            return index
    raise WebUIError("not_found", "That message is no longer in the session; reload it.")


def user_name(doc: dict) -> str:
    return next(p["name"] for p in doc["participants"] if p["is_user"])


def bot_names(doc: dict) -> list[str]:
    return [p["name"] for p in doc["participants"] if not p["is_user"]]


def new_swipe(text: str = "", tokens: int | None = None, tokens_per_second: float | None = None) -> dict:
    return {"text": text, "time": schema.now(), "tokens": tokens, "tokens_per_second": tokens_per_second}


def add_message(doc: dict, author: str, is_user: bool, text: str, message_id: str | None = None) -> dict:
    message = {
        "id": message_id or schema.new_message_id(),
        "author": author,
        "is_user": is_user,
        "chosen": 0,
        "swipes": [new_swipe(text)],
    }
    doc["messages"].append(message)
    return message


def last_bot_message(doc: dict) -> dict:
    """The message that regenerate and continue work on: it must be the last one and a bot's."""
    if not doc["messages"] or doc["messages"][-1]["is_user"]:
        raise WebUIError("invalid_operation", "The last message is not a bot's reply; send a message instead.")
    return doc["messages"][-1]


def check_room_for_swipes(message: dict, count: int) -> None:
    room = schema.MAX_SWIPES - len(message["swipes"])
    if room <= 0:
        raise WebUIError(
            "invalid_operation", f"This reply already has {schema.MAX_SWIPES} alternatives; delete it to start over."
        )
    if count > room:
        raise WebUIError("invalid_operation", f"Only {room} more alternatives fit on this reply; ask for fewer.")


def add_swipes(message: dict, count: int = 1) -> int:
    """Append `count` empty alternatives and show the first of them; returns its index."""
    check_room_for_swipes(message, count)
    message["swipes"].extend(new_swipe() for _ in range(count))
    message["chosen"] = len(message["swipes"]) - count
    return message["chosen"]


def choose_swipe(doc: dict, message_id: str, swipe: int) -> None:
    message = doc["messages"][index_of(doc, message_id)]
    if not 0 <= swipe < len(message["swipes"]):
        raise WebUIError("bad_request", f"This message has swipes 0 to {len(message['swipes']) - 1}.")
    message["chosen"] = swipe


def edit_message(doc: dict, message_id: str, text: str) -> None:
    """Replace the text of the shown alternative; its generation statistics no longer apply."""
    message = doc["messages"][index_of(doc, message_id)]
    message["swipes"][message["chosen"]] = new_swipe(text)


def delete_message(doc: dict, message_id: str) -> None:
    del doc["messages"][index_of(doc, message_id)]


def rewind(doc: dict, message_id: str) -> None:
    """Go back to the moment right after `message_id`: it stays, everything later goes."""
    del doc["messages"][index_of(doc, message_id) + 1 :]


def branch(doc: dict, message_id: str) -> dict:
    """A new document with this session's setup and its messages up to and including `message_id`."""
    copied = copy.deepcopy(doc)
    rewind(copied, message_id)
    copied["title"] = branch_title(doc["title"], "branch")
    copied["created"] = schema.now()
    return copied


def duplicate(doc: dict) -> dict:
    copied = copy.deepcopy(doc)
    copied["title"] = branch_title(doc["title"], "copy")
    copied["created"] = schema.now()
    return copied


def branch_title(title: str, word: str) -> str:
    suffix = f" ({word})"
    return title[: schema.MAX_TITLE - len(suffix)] + suffix


# The fields of a session's setup that a user may set, each with its check.
SETUP_FIELDS = {
    "title": schema.check_title,
    "participants": schema.check_participants,
    "fixed_prompt": lambda value: schema.check_text(value, "The fixed prompt", schema.MAX_FIXED_PROMPT),
    "keep_fixed_prompt": lambda value: _check_flag(value, "keep_fixed_prompt"),
}


def set_up(doc: dict, fields: dict) -> None:
    """Set any of title, participants, fixed prompt, keep_fixed_prompt and settings (settings merge
    over the current ones, so a client can send only what changed)."""
    unknown = set(fields) - set(SETUP_FIELDS) - {"settings"}
    if unknown:
        raise WebUIError("bad_request", f"{sorted(unknown)[0]!r} is not a session setting one can change.")
    try:
        for name, check in SETUP_FIELDS.items():
            if name in fields:
                doc[name] = check(fields[name])
        if "settings" in fields:
            doc["settings"] = schema.check_settings(fields["settings"], base=doc["settings"])
        schema.check_consistency(doc)
    except schema.SchemaError as exc:
        raise WebUIError("bad_request", str(exc)) from exc


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise schema.SchemaError(f"{name} must be true or false.")
    return value
