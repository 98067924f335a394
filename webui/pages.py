"""The page a browser opens; the chat app itself arrives with the browser UI."""

from flask import Blueprint, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return render_template("index.html")
