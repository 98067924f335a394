"""Start the chat server, or manage its accounts.

    python app.py [-d MODEL] [--gpu-split GIB,GIB|auto] [--lora [NAME=]DIR ...] [--host 127.0.0.1] [--port 5000]
                  [--sessions-dir sessions] [--auth [--allow-register]]
    python app.py [--sessions-dir sessions] adduser NAME
"""

import argparse
import getpass
import ipaddress
import logging
import sys
import threading
import time

import engine
from engine.__main__ import add_gpu_split_argument, add_kv_cache_argument, lora_folder
from webui import create_app
from webui.accounts import Accounts
from webui.errors import WebUIError
from webui.rooms import socketio

PROGRESS_SECONDS = 5


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Local LLM chat server.")
    parser.add_argument("-d", "--model", default="default",
                        help="model folder or file (default: the built-in small model)")
    parser.add_argument("--device", default=None, help="where the model runs, e.g. cpu or cuda:0 (default: cuda when available)")
    add_gpu_split_argument(parser)
    add_kv_cache_argument(parser)
    parser.add_argument("--lora", type=lora_folder, action="append", default=[], metavar="[NAME=]DIR",
                        help="PEFT LoRA adapter folder that chats may choose, repeatable; "
                             "NAME defaults to the folder's name")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--sessions-dir", default="sessions",
                        help="where sessions and accounts live (default: sessions)")
    parser.add_argument("--auth", action="store_true", help="require accounts (needed to listen beyond this machine)")
    parser.add_argument("--allow-register", action="store_true", help="with --auth: let visitors create accounts")
    commands = parser.add_subparsers(dest="command")
    adduser = commands.add_parser("adduser", help="create an account for --auth mode")
    adduser.add_argument("name")
    return parser.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_user(sessions_dir: str, name: str) -> int:
    password = getpass.getpass(f"Password for {name}: ")
    if password != getpass.getpass("Repeat it: "):
        print("The passwords differ; nothing was changed.", file=sys.stderr)
        return 1
    try:
        Accounts(f"{sessions_dir}/.users.json").add(name, password)
    except WebUIError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(f"Added {name}. Start the server with --auth to use accounts.")
    return 0


def load_model_with_progress(name: str, device: str, gpu_split: str | None, lora: list[tuple[str, str]],
                             kv_cache: str = "full"):
    """Load the model, printing the time spent every few seconds: engine.load_model reports nothing
    until it is done, and a large model takes minutes."""
    where = f"GPUs split {gpu_split}" if gpu_split else device or engine.loader.default_device()
    print(f"Loading model {name} on {where} ...", flush=True)
    started = time.monotonic()
    done = threading.Event()

    def report_elapsed():
        while not done.wait(PROGRESS_SECONDS):
            print(f"  still loading, {time.monotonic() - started:.0f} s so far", flush=True)

    threading.Thread(target=report_elapsed, daemon=True).start()
    try:
        model = engine.load_model(name, device=device, gpu_split=gpu_split, lora=lora, kv_cache=kv_cache)
    finally:
        done.set()
    print(f"Loaded {model.name} in {time.monotonic() - started:.1f} s; context {model.max_seq_len} tokens, "
          f"{model.kv_cache} KV cache.", flush=True)
    if lora:
        print(f"LoRA adapters: {', '.join(model.adapters.folders)}", flush=True)
    return model


def serve(args: argparse.Namespace) -> int:
    if not is_loopback(args.host) and not args.auth:
        print(
            f"Refusing to listen on {args.host} without --auth: anyone who can reach it could read every chat. "
            "Add --auth, or listen on 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    if args.allow_register and not args.auth:
        print("--allow-register only makes sense with --auth.", file=sys.stderr)
        return 2
    try:
        model = load_model_with_progress(args.model, args.device, args.gpu_split, args.lora, args.kv_cache)
    except engine.ModelError as exc:
        print(exc, file=sys.stderr)
        return 1
    app = create_app(
        {"SESSIONS_DIR": args.sessions_dir, "AUTH": args.auth, "ALLOW_REGISTER": args.allow_register}, model=model
    )
    mode = "accounts" if args.auth else "local mode, one user"
    print(f"Serving on http://{args.host}:{args.port} ({mode}); sessions in {args.sessions_dir}/", flush=True)
    # Werkzeug's threaded server with simple-websocket carries the websockets; it serves a handful of
    # people on one GPU, which is what this server is for.
    socketio.run(app, host=args.host, port=args.port, allow_unsafe_werkzeug=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "adduser":
        return add_user(args.sessions_dir, args.name)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
