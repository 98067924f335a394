"""Sampling (penalties, truncation samplers) on hand-made logits, and the generator on the default model:
seeds, stop strings, constrained choice, cancellation and prefix reuse."""

import threading

import pytest
import torch

from engine.generator import Generator, StopStringFilter
from engine.sampling import SamplingSettings, apply_penalties, sample, truncate
from references import our_model


def test_settings_from_dict_coerces_types_and_ignores_the_rest():
    settings = SamplingSettings.from_dict(
        {"temperature": "0.5", "top_k": "40", "top_p": 0.9, "seed": 7.0, "min_p": None, "unknown": 1})
    assert settings == SamplingSettings(temperature=0.5, top_k=40, top_p=0.9, seed=7)
    assert isinstance(settings.top_k, int) and isinstance(settings.seed, int)
    assert SamplingSettings.from_dict(settings.to_dict()) == settings


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_greedy_is_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [], SamplingSettings(temperature=0), None) == int(logits.argmax())


@pytest.mark.parametrize("seed", range(5))
def test_top_k_one_is_greedy(seed):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(seed))
    rng = torch.Generator().manual_seed(seed)
    assert sample(logits, [], SamplingSettings(temperature=1.5, top_k=1), rng) == int(logits.argmax())


PROBS = [0.05, 0.5, 0.15, 0.3]  # sorted by probability: 1, 3, 2, 0


@pytest.mark.parametrize("settings, expected", [
    # top-p keeps the smallest set of most likely tokens whose mass reaches p
    (SamplingSettings(temperature=1, top_p=0.1), {1}),
    (SamplingSettings(temperature=1, top_p=0.75), {1, 3}),
    (SamplingSettings(temperature=1, top_p=0.85), {1, 3, 2}),
    (SamplingSettings(temperature=1, top_p=0.99), {1, 3, 2, 0}),
    # min-p keeps tokens at least min_p times as likely as the best one
    (SamplingSettings(temperature=1, min_p=0.25), {1, 3, 2}),
    (SamplingSettings(temperature=1, min_p=0.61), {1}),
    (SamplingSettings(temperature=1, top_k=2), {1, 3}),
], ids=["top_p-0.1", "top_p-0.75", "top_p-0.85", "top_p-0.99", "min_p-0.25", "min_p-0.61", "top_k-2"])
def test_truncation_keeps_the_expected_tokens(settings, expected):
    assert kept(truncate(logits_of(PROBS), settings)) == expected


# Locally typical sampling on p = [0.4, 0.3, 0.2, 0.1]: the entropy is 1.2799 nats and the surprisals
# -ln p are 0.916, 1.204, 1.609, 2.303, so by closeness to the entropy the order is 1 (0.076), 2 (0.329),
# 0 (0.364), 3 (1.023). The smallest prefix of that order holding the mass is kept: the most likely
# token goes before the less likely but more typical ones.
@pytest.mark.parametrize("mass, expected", [(0.2, {1}), (0.4, {1, 2}), (0.6, {1, 2, 0}), (0.95, {0, 1, 2, 3})])
def test_typical_keeps_the_most_typical_tokens(mass, expected):
    assert kept(truncate(logits_of([0.4, 0.3, 0.2, 0.1]), SamplingSettings(temperature=1, typical=mass))) == expected


def test_temperature_scales_the_logits():
    logits = torch.tensor([2.0, -1.0, 0.5])
    assert torch.equal(truncate(logits, SamplingSettings(temperature=0.5)), logits / 0.5)


def exllama_repetition_penalty(logits, history, penalty, sustain, decay):
    """ExLlama's apply_rep_penalty_cpu transcribed line by line: the reference for what sustain and decay mean."""
    logits = logits.clone()
    v = penalty
    dv = (1.0 - penalty) / decay if decay else 0.0
    s = sustain
    begin = max(len(history) - sustain - decay, 0)
    seen = set()
    for i in range(len(history) - 1, begin - 1, -1):
        t = history[i]
        if t not in seen:
            logits[t] = logits[t] / v if logits[t] > 0 else logits[t] * v
            seen.add(t)
        s -= 1
        if s < 0:
            v += dv
    return logits


@pytest.mark.parametrize("penalty, sustain, decay", [(2.0, 2, 4), (1.3, 5, 3), (1.5, 3, 0), (0.8, 2, 4), (1.2, 0, 6)])
def test_repetition_penalty_matches_exllama(penalty, sustain, decay):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, generator=gen) * 3  # both signs, so division and multiplication are exercised
    history = torch.randint(0, 20, (30,), generator=gen).tolist()
    settings = SamplingSettings(repetition_penalty=penalty, repetition_sustain=sustain, repetition_decay=decay)
    expected = exllama_repetition_penalty(logits, history, penalty, sustain, decay)
    assert torch.allclose(apply_penalties(logits, history, settings), expected, rtol=1e-6, atol=0)


def test_repetition_penalty_fades_after_sustain():
    # Tokens 10..16 seen once each, 16 last. Sustain 2, decay 4, penalty 2: as in ExLlama, the last two
    # tokens and the first of the decay ones get the full penalty, the next ones 1.75, 1.5, 1.25, older
    # ones none.
    history = [10, 11, 12, 13, 14, 15, 16]
    logits = torch.full((20,), 6.0)
    logits[11] = -6.0  # a negative logit is multiplied instead of divided
    settings = SamplingSettings(repetition_penalty=2.0, repetition_sustain=2, repetition_decay=4)
    expected = torch.full((20,), 6.0)
    expected[[16, 15, 14, 13, 12]] = 6.0 / torch.tensor([2.0, 2.0, 2.0, 1.75, 1.5])
    expected[11] = -6.0 * 1.25
    assert torch.allclose(apply_penalties(logits, history, settings), expected, rtol=1e-6, atol=0)


def test_frequency_and_presence_penalties_count_the_window():
    history = [3, 3, 3, 5, 7, 7]
    settings = SamplingSettings(frequency_penalty=0.5, presence_penalty=0.25, repetition_sustain=5,
                                repetition_decay=0)  # token 3's first occurrence falls outside the window
    out = apply_penalties(torch.zeros(10), history, settings)
    expected = torch.zeros(10)
    expected[3] = -(2 * 0.5 + 0.25)
    expected[5] = -(0.5 + 0.25)
    expected[7] = -(2 * 0.5 + 0.25)
    assert torch.equal(out, expected)


def test_allowed_tokens_constrain_sampling():
    logits = torch.tensor([10.0, 0.0, -5.0, 3.0])
    assert sample(logits, [], SamplingSettings(temperature=0), None, allowed=[1, 2]) == 1
    rng = torch.Generator().manual_seed(0)
    draws = {sample(logits, [], SamplingSettings(temperature=2), rng, allowed=[2, 3]) for _ in range(50)}
    assert draws <= {2, 3}


def feed(stops, pieces) -> tuple[str, bool]:
    """Everything a StopStringFilter lets through for these pieces, and whether it stopped."""
    stop_filter = StopStringFilter(stops)
    shown = ""
    for piece in pieces:
        shown += stop_filter.feed(piece)
        if stop_filter.stopped:  # the generator ends there
            return shown, True
    return shown + stop_filter.flush(), False


STOP_CASES = [
    # (stop strings, text, what is shown, stopped)
    (["\nUser:"], "abc\nUser: hi", "abc", True),
    (["\nUser:"], "abc\nUt and more", "abc\nUt and more", False),
    (["\nUser:"], "abc\nUs", "abc\nUs", False),  # the end of the stream releases what was held
    (["aab"], "aaab tail", "a", True),  # a held prefix that fails can still end in a new one
    (["###", "\n\n"], "one\ntwo\n\nthree", "one\ntwo", True),
    (["###", "\n\n"], "x ## y ### z", "x ## y ", True),
    ([], "no stops at all", "no stops at all", False),
]


@pytest.mark.parametrize("stops, text, shown, stopped", STOP_CASES)
@pytest.mark.parametrize("split", ["chars", "whole"])
def test_stop_string_filter_never_shows_what_it_must_retract(stops, text, shown, stopped, split):
    pieces = list(text) if split == "chars" else [text]
    assert feed(stops, pieces) == (shown, stopped)


def test_stop_string_filter_holds_a_partial_stop_until_it_resolves():
    stop_filter = StopStringFilter(["\nUser:"])
    assert stop_filter.feed("abc\nUs") == "abc"
    assert stop_filter.feed("er: hi") == "" and stop_filter.stopped
    stop_filter = StopStringFilter(["\nUser:"])
    assert stop_filter.feed("abc\nU") == "abc"
    assert stop_filter.feed("t") == "\nUt" and not stop_filter.stopped


# The generator on the default model. Generators share the model's KV cache, so each test builds its own.
PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"


def prompt_ids(text=PROMPT):
    return our_model().tokenizer.encode_chat(text)


def run(generator, ids, settings, **options):
    stream = generator.generate(ids, settings, **options)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    return stream.result


def test_same_seed_same_tokens():
    settings = SamplingSettings(temperature=1.0, top_p=0.95, seed=1234)
    first = run(Generator(our_model()), prompt_ids(), settings, max_new_tokens=6, stop_on_eos=False)
    second = run(Generator(our_model()), prompt_ids(), settings, max_new_tokens=6, stop_on_eos=False)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 6


def test_stop_string_ends_generation_and_is_not_shown():
    greedy = SamplingSettings(temperature=0)
    free = run(Generator(our_model()), prompt_ids(), greedy, max_new_tokens=12, stop_on_eos=False)
    # A stop string the model is known to produce: the second word of its own greedy reply.
    stop = free.text.split()[1]
    stopped = run(Generator(our_model()), prompt_ids(), greedy, max_new_tokens=12, stop_on_eos=False,
                  stop_strings=[stop])
    assert stopped.stop_reason == "stop_string"
    assert stopped.text == free.text[:free.text.index(stop)]
    assert len(stopped.token_ids) < len(free.token_ids)


CHOICE_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is"


def test_choose_follows_the_models_preference_among_the_options():
    options = [" Berlin", " Paris", " a banana"]
    generator = Generator(our_model())
    ids = prompt_ids(CHOICE_PROMPT)
    logits, _ = generator.prefill(ids)
    firsts = [our_model().tokenizer.encode(option)[0] for option in options]
    assert len(set(firsts)) == len(options)  # so that the first token alone decides
    expected = max(range(len(options)), key=lambda i: logits[firsts[i]].item())
    assert generator.choose(ids, options, SamplingSettings(temperature=0)) == expected == 1


# A lone option the model would never write gets picked anyway; options sharing a prefix split late.
@pytest.mark.parametrize("options", [[" zxqvj"], [" Paris Hilton", " Parisian"]])
def test_choose_only_ever_picks_an_option(options):
    generator = Generator(our_model())
    ids = prompt_ids(CHOICE_PROMPT)
    picks = {generator.choose(ids, options, SamplingSettings(temperature=1.5, seed=seed)) for seed in range(2)}
    assert picks <= set(range(len(options)))


def test_a_set_cancel_event_stops_before_any_token():
    cancel = threading.Event()
    cancel.set()
    result = run(Generator(our_model()), prompt_ids(), SamplingSettings(temperature=0), max_new_tokens=20,
                 cancel=cancel)
    assert result.stop_reason == "cancelled" and len(result.token_ids) <= 1


def test_cancel_during_streaming_stops_after_the_current_token():
    cancel = threading.Event()
    stream = Generator(our_model()).generate(prompt_ids(), SamplingSettings(temperature=0), max_new_tokens=50,
                                             stop_on_eos=False, cancel=cancel)
    shown = []
    for piece in stream:
        shown.append(piece)
        cancel.set()
    result = stream.result
    assert result.stop_reason == "cancelled"
    assert shown == [result.text] and our_model().tokenizer.decode(result.token_ids) == result.text


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("second_prompt", [
    "<|im_start|>user\nWrite a short story about the moon.<|im_end|>\n<|im_start|>assistant\n",  # new question
    PROMPT,  # the very same prompt
    "<|im_start|>user\nWrite a short poem",  # a shorter one: the cache rewinds
], ids=["new-question", "same", "shorter"])
def test_prefix_reuse_reports_reused_tokens_and_changes_nothing(second_prompt):
    greedy = SamplingSettings(temperature=0)
    first_ids, second_ids = prompt_ids(), prompt_ids(second_prompt)
    # The last prompt token always runs again: its logits choose the first new token.
    expected = min(common_prefix(first_ids, second_ids), len(second_ids) - 1)
    assert expected > 0
    generator = Generator(our_model())
    run(generator, first_ids, greedy, max_new_tokens=2, stop_on_eos=False)
    again = run(generator, second_ids, greedy, max_new_tokens=6, stop_on_eos=False)
    fresh = run(Generator(our_model()), second_ids, greedy, max_new_tokens=6, stop_on_eos=False)
    assert again.reused_tokens == expected and fresh.reused_tokens == 0
    assert again.token_ids == fresh.token_ids


def test_a_reply_ended_by_a_stop_string_leaves_a_true_record_of_the_cache():
    # Each decode step is queued before the host reads the token that feeds it, so the step after the token
    # that completes a stop string runs too: the cache then holds that token, and the generator's record of
    # the cache must say so, neither more nor less.
    greedy = SamplingSettings(temperature=0)
    ids = prompt_ids()
    free = run(Generator(our_model()), ids, greedy, max_new_tokens=12, stop_on_eos=False)
    generator = Generator(our_model())
    stopped = run(generator, ids, greedy, max_new_tokens=12, stop_on_eos=False, stop_strings=[free.text.split()[1]])
    assert stopped.stop_reason == "stop_string"
    assert generator.cached == ids + stopped.token_ids
    follow = ids + free.token_ids
    again = run(generator, follow, greedy, max_new_tokens=4, stop_on_eos=False)
    fresh = run(Generator(our_model()), follow, greedy, max_new_tokens=4, stop_on_eos=False)
    assert again.reused_tokens == len(ids) + len(stopped.token_ids)
    assert again.token_ids == fresh.token_ids
