"""The one error type the web layer raises for anything a user can see: a stable code for programs and
one sentence for people. HTTP routes turn it into a JSON body, socket events into a `chat_error` event."""

# Each code with the HTTP status it travels under.
STATUS_BY_CODE = {
    "bad_request": 400,
    "login_required": 401,
    "bad_login": 401,
    "registration_closed": 403,
    "not_found": 404,
    "stale_revision": 409,
    "busy": 409,
    "invalid_operation": 409,
    "user_exists": 409,
    "too_large": 413,
    "corrupt": 500,
    "storage": 500,
    "model_error": 500,
    "internal": 500,
    "no_model": 503,
    "disk_full": 507,
}


class WebUIError(Exception):
    """A refusal or failure worded for the user; `code` is one of STATUS_BY_CODE."""

    def __init__(self, code: str, message: str):
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.code]

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def internal_error() -> WebUIError:
    """What a client is told about a bug; the traceback goes to the server log only."""
    return WebUIError("internal", "Something went wrong on the server; details are in its log.")
