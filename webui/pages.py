"""The page a browser opens, and what it shows about the server's model."""

from flask import Blueprint, current_app, jsonify, render_template

from .auth import require_user
from .errors import WebUIError

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return render_template("index.html")


@bp.get("/api/model")
def model_info():
    """The model the server runs: its name, context length, device and KV cache kind for the page's model chip,
    and the LoRA adapters loaded with it, which sessions and bots may choose from."""
    require_user()
    model = current_app.extensions["model"]
    if model is None:
        raise WebUIError("no_model", "This server runs without a model.")
    return jsonify(name=model.name, context=model.max_seq_len, device=str(model.device), kv_cache=model.kv_cache,
                   adapters=list(model.adapters.folders))
