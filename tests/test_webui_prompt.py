"""Prompt building with the default model's tokenizer: the roleplay transcript, the chat template,
context overflow, and a prefix that stays the same from turn to turn so the KV cache is reused."""

import pytest

from webui import operations, schema
from webui.errors import WebUIError
from webui.prompt import build_prompt


@pytest.fixture
def tokenizer(default_model):
    return default_model.tokenizer


def chat(turns, **fields):
    doc = schema.new_session()
    doc.update(fields)
    for number, text in enumerate(turns):
        is_user = number % 2 == 0
        operations.add_message(doc, "You" if is_user else "Assistant", is_user, text, f"m{number}")
    return doc


def test_roleplay_transcript(tokenizer):
    doc = chat(["Hi", "Hello!"])
    prompt = build_prompt(doc, tokenizer, doc["messages"], "Assistant", None, 1000)
    assert tokenizer.decode(prompt.ids) == (
        "This is a conversation between You and Assistant.\nAssistant is a helpful, friendly AI.\n"
        "You: Hi\nAssistant: Hello!\nAssistant:"
    )
    assert prompt.stop_strings == ["\nYou:", "\nyou:", "\nAssistant:", "\nassistant:"]
    assert prompt.first_message_id == "m0"
    continued = build_prompt(doc, tokenizer, doc["messages"][:-1], "Assistant", "Hello!", 1000)
    assert tokenizer.decode(continued.ids).endswith("You: Hi\nAssistant: Hello!")
    doc["settings"]["end_on_newline"] = True
    assert build_prompt(doc, tokenizer, doc["messages"], "Assistant", None, 1000).stop_strings == ["\n"]


def test_speaker_choice_prompt_ends_after_the_last_line(tokenizer):
    doc = chat(["Hi"])
    assert tokenizer.decode(build_prompt(doc, tokenizer, doc["messages"], None, None, 1000).ids).endswith("You: Hi\n")


def test_chat_template(tokenizer):
    doc = chat(["Hi", "Hello!", "How are you?"])
    doc["settings"]["prompt_format"] = "chat_template"
    text = tokenizer.decode(build_prompt(doc, tokenizer, doc["messages"], "Assistant", None, 1000).ids)
    assert text.startswith("<|im_start|>system\nThis is a conversation between You and Assistant.")
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>" in text
    assert text.endswith("<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")


def test_overflow_drops_the_oldest_messages_and_keeps_a_pinned_fixed_prompt(tokenizer):
    doc = chat([f"message number {n} " + "words " * 20 for n in range(20)])
    prompt = build_prompt(doc, tokenizer, doc["messages"], "Assistant", None, 300)
    text = tokenizer.decode(prompt.ids)
    assert len(prompt.ids) <= 300
    assert text.startswith("This is a conversation between You and Assistant.")
    assert "message number 0 " not in text and "message number 19 " in text
    doc["keep_fixed_prompt"] = False
    unpinned = tokenizer.decode(build_prompt(doc, tokenizer, doc["messages"], "Assistant", None, 300).ids)
    assert "This is a conversation" not in unpinned and unpinned.split(": ")[1].startswith("message number")


def test_after_an_overflow_the_prompt_keeps_its_start_for_the_next_turns(tokenizer):
    doc = chat([f"message number {n} " + "words " * 20 for n in range(20)])
    first = build_prompt(doc, tokenizer, doc["messages"], "Assistant", None, 300)
    operations.add_message(doc, "Assistant", False, "short reply", "m20")
    operations.add_message(doc, "You", True, "short question", "m21")
    second = build_prompt(doc, tokenizer, doc["messages"], "Assistant", None, 300, keep_from=first.first_message_id)
    assert second.first_message_id == first.first_message_id
    tail = len(tokenizer.encode("Assistant:"))
    assert second.ids[: len(first.ids) - tail] == first.ids[:-tail]


def test_a_fixed_prompt_larger_than_the_context_is_an_error(tokenizer):
    doc = chat(["Hi"], fixed_prompt="word " * 400)
    with pytest.raises(WebUIError) as refused:
        build_prompt(doc, tokenizer, doc["messages"], "Assistant", None, 100)
    assert "shorten them" in refused.value.message
