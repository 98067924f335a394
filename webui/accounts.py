"""User accounts and the cookie-signing key, both kept in the sessions folder so that one folder holds
everything a server needs to come back as it was."""

import json
import logging
import secrets
import threading
from pathlib import Path

from werkzeug.security import check_password_hash, generate_password_hash

from .errors import WebUIError
from .files import write_atomic
from .store import USER_NAME

log = logging.getLogger(__name__)

MIN_PASSWORD = 8
MAX_PASSWORD = 200
# The user of local mode (no --auth). Self-registration may not claim it; `adduser local` may, to take
# over the chats made in local mode.
LOCAL_USER = "local"


class Accounts:
    """name -> werkzeug password hash, in one JSON file read on every use, so that `app.py adduser`
    takes effect on a running server."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._write_lock = threading.Lock()
        # Checked against when the name is unknown, so a wrong name costs as long as a wrong password.
        self._dummy_hash = generate_password_hash(secrets.token_hex(16))

    def exists(self, name: str) -> bool:
        return name in self._read()

    def add(self, name: str, password: str) -> None:
        name = check_user_name(name)
        check_password(password)
        with self._write_lock:
            users = self._read()
            if name in users:
                raise WebUIError("user_exists", f"The user name {name!r} is taken; pick another.")
            users[name] = generate_password_hash(password)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({"users": users}, indent=1).encode())

    def verify(self, name, password) -> bool:
        if not isinstance(name, str) or not isinstance(password, str):
            return False
        stored = self._read().get(name.strip().lower())
        return check_password_hash(stored or self._dummy_hash, password) and stored is not None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())["users"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError) as exc:
            raise WebUIError(
                "storage", f"The accounts file {self.path} is unreadable ({exc}); restore or remove it."
            ) from exc


def check_user_name(name) -> str:
    if not isinstance(name, str) or not USER_NAME.fullmatch(name.strip().lower()):
        raise WebUIError(
            "bad_request",
            "A user name is 1 to 32 lowercase letters, digits, '-' or '_', starting with a letter or digit.",
        )
    return name.strip().lower()


def check_password(password) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise WebUIError("bad_request", f"A password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters.")
    return password


def load_or_create_secret_key(path: Path) -> str:
    """The key that signs login cookies: made once, readable by the server's user only, kept across
    restarts so that logins survive them."""
    path = Path(path)
    if path.exists():
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; run: chmod 600 %s", path, path)
    else:
        # write_atomic's temp file is created 0600, and the rename means no half-written key is ever read.
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, secrets.token_hex(32).encode())
    return path.read_text().strip()
