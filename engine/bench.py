"""Prompt-processing and decode speed of a loaded model, measured through the real generator."""

from __future__ import annotations

import statistics
import time

import torch

from .generator import Generator
from .loader import LoadedModel
from .sampling import SamplingSettings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loaded: LoadedModel, prompt_len: int = 128, new_tokens: int = 128, runs: int = 5) -> dict:
    """Median tokens/s over `runs` runs after one warm-up; every run starts from an empty cache."""
    generator = Generator(loaded)
    rng = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, loaded.config.vocab_size, (prompt_len,), generator=rng).tolist()
    greedy = SamplingSettings(temperature=0)
    prompt_rates, decode_rates = [], []
    for run in range(runs + 1):
        generator.cached = []
        _sync(loaded.device)
        started = time.perf_counter()
        generator.prefill(prompt)
        _sync(loaded.device)
        prompt_seconds = time.perf_counter() - started
        stream = generator.generate(prompt, greedy, max_new_tokens=new_tokens, stop_on_eos=False)
        for _ in stream:
            pass
        _sync(loaded.device)
        if run:  # run 0 warms up allocators and caches
            prompt_rates.append(prompt_len / prompt_seconds)
            decode_rates.append(stream.result.tokens_per_second)
    return {
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prompt_tok_s": round(statistics.median(prompt_rates), 2),
        "decode_tok_s": round(statistics.median(decode_rates), 2),
        "decode_runs": [round(r, 2) for r in decode_rates],
    }
