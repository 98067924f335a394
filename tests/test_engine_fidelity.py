"""The default model on CPU in float32 against HF transformers reading the same GGUF file."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from engine.evaluate import perplexity
from engine.generator import Generator
from engine.sampling import SamplingSettings
from references import hf_model, our_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat are the three primary colours?<|im_end|>\n<|im_start|>assistant\n",
    "Zahlen: 1, 2, 3, 4, 5, 6 und dann 😀 emoji —",
]
TEXT_FILE = os.path.join(os.path.dirname(__file__), "data", "ppl_text.txt")


def prompt_ids(text):
    return our_model().tokenizer.encode_chat(text)


@pytest.mark.parametrize("text", PROMPTS)
def test_last_position_logits_match_transformers(text):
    ids = prompt_ids(text)
    with torch.inference_mode():
        reference = hf_model()(torch.tensor([ids])).logits[0, -1]
        ours = our_model().model(torch.tensor([ids]), 0)[0, -1]
    tolerance = 1e-3 * reference.abs().max().item()
    assert (ours - reference).abs().max().item() <= tolerance


def hf_greedy(ids, steps):
    """A plain greedy loop over HF's model, with its own KV cache, no generate() conveniences."""
    model = hf_model()
    out, past, inputs = [], None, torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(steps):
            result = model(inputs, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            inputs = torch.tensor([[token]])
    return out


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_40_tokens_identical(text):
    ids = prompt_ids(text)
    stream = Generator(our_model()).generate(ids, SamplingSettings(temperature=0), max_new_tokens=40,
                                             stop_on_eos=False)
    "".join(stream)
    assert stream.result.token_ids == hf_greedy(ids, 40)


def hf_perplexity(ids, ctx):
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - ctx + 1, ctx):
            window = torch.tensor([ids[start:start + ctx]])
            logits = hf_model()(window).logits[0, :-1]
            total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += ctx - 1
    return math.exp(total / count)


def test_perplexity_within_half_a_percent_of_transformers():
    with open(TEXT_FILE, encoding="utf-8") as f:
        ids = our_model().tokenizer.encode(f.read())
    ours = perplexity(our_model(), ids, ctx=256)
    reference = hf_perplexity(ids, ctx=256)
    assert len(ids) >= 4 * 256
    assert abs(ours - reference) / reference < 0.005
