"""Parallel samples with shared-prefix (bifurcated) attention, on CPU in float32: each sample sees the logits
a single-sample run over the same tokens sees, draws the tokens a single generation with its seed draws,
and stops on its own terms."""

import threading

import pytest
import torch

from engine.cache import bifurcated_attention, grouped_attention
from engine.generator import Generator
from engine.parallel import ParallelGenerator, Sample, SharedPrefixDecoder
from engine.sampling import SamplingSettings
from references import our_model

PROMPT = "The old lighthouse keeper looked at the sea and said"


@pytest.fixture(scope="module")
def float32_model():
    return our_model(torch.float32)


@pytest.fixture(scope="module")
def generator(float32_model):
    return Generator(float32_model)


@pytest.fixture(scope="module")
def prompt_ids(float32_model):
    return float32_model.tokenizer.encode(PROMPT)


def single_run_logits(loaded, prompt_ids, tokens):
    """Logits [len(tokens), vocab] after each of `tokens` fed one sample's way: the whole sequence at once."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + tokens]), 0, last_only=False)[0]
    return logits[len(prompt_ids):]


def assert_float32_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-4)


def test_bifurcated_attention_is_attention_over_each_samples_whole_cache():
    torch.manual_seed(0)
    samples, heads, kv_heads, head_dim, context, own = 3, 6, 2, 16, 11, 4
    q = torch.randn(samples, heads, 1, head_dim)
    context_keys, context_values = torch.randn(2, kv_heads, context + 5, head_dim)  # 5 slots past the context
    own_keys, own_values = torch.randn(2, samples, kv_heads, own + 3, head_dim)  # 3 slots not written yet
    context_bias = torch.zeros(context + 5).masked_fill(torch.arange(context + 5) >= context, float("-inf"))
    own_bias = torch.zeros(own + 3).masked_fill(torch.arange(own + 3) >= own, float("-inf"))
    out = bifurcated_attention(q, context_keys, context_values, context_bias, own_keys, own_values, own_bias)

    # The same attention with the context copied into every sample's cache, garbage slots left out.
    keys = torch.cat((context_keys[:, :context].expand(samples, -1, -1, -1), own_keys[:, :, :own]), dim=2)
    values = torch.cat((context_values[:, :context].expand(samples, -1, -1, -1), own_values[:, :, :own]), dim=2)
    expected = grouped_attention(q, keys, values, torch.zeros(1, context + own))
    assert_float32_close(out, expected)


def test_each_sample_sees_the_logits_of_a_single_sample_run(float32_model, generator, prompt_ids):
    tokens = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(0))
    generator.prefill(prompt_ids)
    decoder = SharedPrefixDecoder(float32_model)
    decoder.start(len(prompt_ids), rows=3, capacity=5)
    steps = torch.stack([decoder.step(tokens[:, t]).clone() for t in range(5)], dim=1)  # [sample, step, vocab]
    for sample in range(3):
        assert_float32_close(steps[sample], single_run_logits(float32_model, prompt_ids, tokens[sample].tolist()))


def test_samples_that_leave_the_batch_leave_the_others_exact(float32_model, generator, prompt_ids):
    """Samples end at different lengths: after two steps the batch keeps samples 3 and 1, in that order."""
    tokens = torch.randint(0, 1000, (4, 5), generator=torch.Generator().manual_seed(1))
    generator.prefill(prompt_ids)
    decoder = SharedPrefixDecoder(float32_model)
    decoder.start(len(prompt_ids), rows=4, capacity=8)
    early = [decoder.step(tokens[:, t]).clone() for t in range(2)]
    decoder.keep_rows([3, 1])
    late = [decoder.step(tokens[[3, 1], t]).clone() for t in range(2, 5)]
    for row, sample in enumerate([3, 1]):
        seen = torch.stack([step[sample] for step in early] + [step[row] for step in late])
        assert_float32_close(seen, single_run_logits(float32_model, prompt_ids, tokens[sample].tolist()))


def single_generation(generator, prompt_ids, request: Sample):
    stream = generator.generate(prompt_ids, request.settings, request.max_new_tokens, request.stop_strings,
                                stop_on_eos=False)
    "".join(stream)
    return stream.result


def test_each_sample_is_the_single_generation_with_its_seed_and_stops(generator, prompt_ids):
    settings = SamplingSettings(temperature=1.0, top_k=40, repetition_penalty=1.1, seed=5)
    requests = Sample.alternatives(settings, 3, max_new_tokens=12)
    requests[0].max_new_tokens = 3  # ends long before the others
    # Sample 2 stops at a stop string taken from the middle of what its seed writes.
    written = single_generation(generator, prompt_ids, requests[2]).text
    requests[2].stop_strings = [written[len(written) // 2:][:3]]
    expected = [single_generation(generator, prompt_ids, request) for request in requests]
    assert [result.stop_reason for result in expected] == ["max_new_tokens", "max_new_tokens", "stop_string"]

    stream = ParallelGenerator(generator).generate(prompt_ids, requests, stop_on_eos=False)
    texts = ["", "", ""]
    for index, text, _ in stream:
        texts[index] += text
    for result, text, wanted in zip(stream.results, texts, expected):
        assert result.token_ids == wanted.token_ids
        assert (result.text, result.stop_reason) == (wanted.text, wanted.stop_reason)
        assert text == result.text and result.prompt_tokens == len(prompt_ids)


def test_a_sample_ends_with_one_finished_event_while_the_others_go_on(generator, prompt_ids):
    requests = Sample.alternatives(SamplingSettings(temperature=1.0, seed=3), 3, max_new_tokens=8)
    requests[1].max_new_tokens = 2
    events = list(ParallelGenerator(generator).generate(prompt_ids, requests, stop_on_eos=False))
    finished = [i for i, event in enumerate(events) if event.finished]
    assert sorted(events[i].index for i in finished) == [0, 1, 2]
    for i in finished:  # nothing follows a sample's last event
        assert all(event.index != events[i].index for event in events[i + 1:])
    assert events[finished[0]].index == 1 and finished[0] < len(events) - 1


def test_cancel_ends_every_sample(generator, prompt_ids):
    cancel = threading.Event()
    requests = Sample.alternatives(SamplingSettings(temperature=1.0, seed=9), 2, max_new_tokens=50)
    stream = ParallelGenerator(generator).generate(prompt_ids, requests, stop_on_eos=False, cancel=cancel)
    for event in stream:
        if event.text:
            cancel.set()
    assert [result.stop_reason for result in stream.results] == ["cancelled", "cancelled"]
    assert all(len(result.token_ids) < 50 for result in stream.results)


def test_the_prompt_stays_cached_for_the_next_turn(generator, prompt_ids):
    requests = Sample.alternatives(SamplingSettings(temperature=1.0, seed=2), 2, max_new_tokens=4)
    list(ParallelGenerator(generator).generate(prompt_ids, requests, stop_on_eos=False))
    assert generator.cached == prompt_ids
    next_turn = prompt_ids + generator.tokenizer.encode(" and then")
    assert generator.prefill(next_turn)[1] == len(prompt_ids)
