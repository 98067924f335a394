"""Turning a session into prompt token ids for the engine.

Two formats: ExLlama's roleplay transcript (the fixed prompt and personas, then one `Name: text` line per
message, then `Speaker:` for the model to go on), or the model's own chat template for a one-bot
instruct chat. When the history outgrows the context, the oldest messages are dropped, in one larger
step rather than one message per turn, and the first kept message is remembered, so that turn after
turn the prompt starts the same way and the engine's KV cache prefix is reused."""

from dataclasses import dataclass

from .errors import WebUIError
from .operations import text_of


@dataclass
class Prompt:
    ids: list[int]
    stop_strings: list[str]
    # The oldest message in the prompt; pass it back as `keep_from` next time to keep the prefix stable.
    first_message_id: str | None


def context_text(doc: dict) -> str:
    """The fixed prompt followed by every participant's persona."""
    parts = [doc["fixed_prompt"].strip()] + [p["persona"].strip() for p in doc["participants"]]
    return "\n".join(part for part in parts if part)


def build_prompt(doc, tokenizer, history, speaker, partial, budget, keep_from=None) -> Prompt:
    """The prompt for `speaker` to say what comes after `history` (a list of messages), going on from
    `partial` when continuing a cut-off reply. With `speaker` None the prompt ends after the history, for
    the model to pick who speaks next. `budget` is the most tokens the prompt may take."""
    if doc["settings"]["prompt_format"] == "chat_template":
        return _chat_template_prompt(doc, tokenizer, history, partial, budget, keep_from)
    return _roleplay_prompt(doc, tokenizer, history, speaker, partial, budget, keep_from)


def _roleplay_prompt(doc, tokenizer, history, speaker, partial, budget, keep_from) -> Prompt:
    # Each piece is tokenized on its own, so adding a line never changes the tokens before it.
    bos = tokenizer.encode("", add_bos=tokenizer.add_bos)  # BOS only for models trained with one
    context = context_text(doc)
    header = tokenizer.encode(context + "\n") if context else []
    lines = [tokenizer.encode(f"{message['author']}: {text_of(message)}\n") for message in history]
    if speaker is None:
        tail = []
    else:
        tail = tokenizer.encode(f"{speaker}:" if partial is None else f"{speaker}: {partial}")

    def size(start: int) -> int:
        kept_header = header if doc["keep_fixed_prompt"] or start == 0 else []
        return len(bos) + len(kept_header) + sum(len(line) for line in lines[start:]) + len(tail)

    start = _first_kept(history, size, budget, keep_from)
    ids = list(bos)
    if doc["keep_fixed_prompt"] or start == 0:
        ids += header
    for line in lines[start:]:
        ids += line
    ids += tail
    # Small models often start the next speaker's line in lower case ("you:"), which ends the reply too.
    names = dict.fromkeys(spelling for p in doc["participants"] for spelling in (p["name"], p["name"].lower()))
    stops = ["\n"] if doc["settings"]["end_on_newline"] else [f"\n{name}:" for name in names]
    return Prompt(ids, stops, history[start]["id"] if start < len(history) else None)


def _chat_template_prompt(doc, tokenizer, history, partial, budget, keep_from) -> Prompt:
    if not tokenizer.has_chat_template:
        raise WebUIError(
            "model_error", "This model has no chat template; set the session's prompt format to roleplay."
        )
    context = context_text(doc)
    turns = [
        {"role": "user" if message["is_user"] else "assistant", "content": text_of(message)} for message in history
    ]

    def render(start: int) -> str:
        keep_context = context and (doc["keep_fixed_prompt"] or start == 0)
        system = [{"role": "system", "content": context}] if keep_context else []
        return tokenizer.render_chat(system + turns[start:], add_generation_prompt=True) + (partial or "")

    sizes: dict[int, int] = {}

    def size(start: int) -> int:
        if start not in sizes:
            sizes[start] = len(tokenizer.encode_chat(render(start)))
        return sizes[start]

    start = _first_kept(history, size, budget, keep_from)
    stops = ["\n"] if doc["settings"]["end_on_newline"] else []
    return Prompt(tokenizer.encode_chat(render(start)), stops, history[start]["id"] if start < len(history) else None)


def _first_kept(history, size, budget, keep_from) -> int:
    """Index of the oldest message to keep. Everything when it fits; else the remembered start when it
    still fits; else drop messages until a quarter of the budget is free, so that the next few turns fit
    without moving the start again."""
    if size(0) <= budget:
        return 0
    ids = [message["id"] for message in history]
    remembered = ids.index(keep_from) if keep_from in ids else 0
    if remembered and size(remembered) <= budget:
        return remembered
    start = max(remembered, 1)
    while start < len(history) and size(start) > budget - budget // 4:
        start += 1
    if size(start) > budget:
        raise WebUIError(
            "invalid_operation",
            f"The fixed prompt, personas and the reply so far take more than the {budget} tokens the model's "
            "context leaves for a prompt; shorten them or lower max reply tokens.",
        )
    return start
