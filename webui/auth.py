"""Who is asking. Local mode has one implicit user; with AUTH on, people log in to accounts and the
signed, HttpOnly, SameSite session cookie carries their name."""

from flask import Blueprint, current_app, jsonify, session

from . import payload
from .accounts import LOCAL_USER, Accounts, check_user_name
from .errors import WebUIError

bp = Blueprint("auth", __name__, url_prefix="/auth")


def current_accounts() -> Accounts:
    return current_app.extensions["accounts"]


def current_user() -> str | None:
    """The user an HTTP request or a socket event acts for, or None when nobody is logged in."""
    if not current_app.config["AUTH"]:
        return LOCAL_USER
    name = session.get("user")
    # An account removed from the accounts file loses access even with a valid cookie.
    return name if isinstance(name, str) and current_accounts().exists(name) else None


def require_user() -> str:
    user = current_user()
    if user is None:
        raise WebUIError("login_required", "Log in first.")
    return user


def _require_accounts_mode() -> None:
    if not current_app.config["AUTH"]:
        raise WebUIError("bad_request", "This server runs in local mode without accounts; start it with --auth.")


@bp.get("/me")
def me():
    return jsonify(
        user=current_user(),
        auth=current_app.config["AUTH"],
        allow_register=current_app.config["AUTH"] and current_app.config["ALLOW_REGISTER"],
    )


@bp.post("/login")
def login():
    _require_accounts_mode()
    body = payload.json_body()
    if not current_accounts().verify(body.get("username"), body.get("password")):
        raise WebUIError("bad_login", "Wrong user name or password.")
    _start_login(check_user_name(body["username"]))
    return jsonify(user=session["user"])


@bp.post("/register")
def register():
    _require_accounts_mode()
    if not current_app.config["ALLOW_REGISTER"]:
        raise WebUIError("registration_closed", "Registration is closed; ask the server's owner for an account.")
    body = payload.json_body()
    name = check_user_name(body.get("username"))
    if name == LOCAL_USER:
        raise WebUIError("user_exists", f"The user name {LOCAL_USER!r} is reserved; pick another.")
    current_accounts().add(name, body.get("password"))
    _start_login(name)
    return jsonify(user=name), 201


@bp.post("/logout")
def logout():
    session.clear()
    return jsonify(user=None)


def _start_login(name: str) -> None:
    # A fresh cookie at login, kept across browser restarts: chats are meant to be found days later.
    session.clear()
    session["user"] = name
    session.permanent = True
