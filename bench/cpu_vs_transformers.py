"""CPU decode speed of the default model: our engine against HF transformers' generate(), in one run.

    .venv/bin/python bench/cpu_vs_transformers.py [--new-tokens 128] [--runs 5] [--dtype float16]

Both decode the same prompt greedily for the same number of tokens; each figure is the median of the
runs after one warm-up. Prints a table and, last, one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
from engine.generator import Generator  # noqa: E402
from engine.loader import default_model_path  # noqa: E402
from engine.sampling import SamplingSettings  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def median_rate(run, runs: int) -> tuple[float, list[float]]:
    run()  # warm-up
    rates = [run() for _ in range(runs)]
    return statistics.median(rates), rates


def transformers_rate(prompt_ids: list[int], new_tokens: int, runs: int):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    inputs = torch.tensor([prompt_ids])

    def timed(tokens: int) -> float:
        started = time.perf_counter()
        model.generate(inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - started

    def run() -> float:
        # Decode rate alone: the one-token run pays the same prompt processing and set-up.
        with torch.inference_mode():
            return (new_tokens - 1) / (timed(new_tokens) - timed(1))

    return median_rate(run, runs)


def engine_rate(loaded, prompt_ids: list[int], new_tokens: int, runs: int):
    generator = Generator(loaded)

    def run() -> float:
        generator.cached = []
        stream = generator.generate(prompt_ids, SamplingSettings(temperature=0), max_new_tokens=new_tokens,
                                    stop_on_eos=False)
        started = time.perf_counter()
        for _ in stream:
            pass
        return new_tokens / (time.perf_counter() - started)

    return median_rate(run, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="our engine's dtype (default: the engine's CPU default)")
    args = parser.parse_args()
    loaded = engine.load_model("default", device="cpu", dtype=getattr(torch, args.dtype) if args.dtype else None)
    tokenizer = loaded.tokenizer
    prompt_ids = tokenizer.encode_chat(tokenizer.render_chat([{"role": "user", "content": PROMPT}]))
    ours, our_runs = engine_rate(loaded, prompt_ids, args.new_tokens, args.runs)
    del loaded
    theirs, their_runs = transformers_rate(prompt_ids, args.new_tokens, args.runs)
    result = {
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "engine_dtype": args.dtype or "default",
        "engine_decode_tok_s": round(ours, 2),
        "transformers_decode_tok_s": round(theirs, 2),
        "ratio": round(ours / theirs, 2),
        "engine_runs": [round(r, 2) for r in our_runs],
        "transformers_runs": [round(r, 2) for r in their_runs],
    }
    print(f"engine        {ours:8.2f} tok/s  {result['engine_runs']}")
    print(f"transformers  {theirs:8.2f} tok/s  {result['transformers_runs']}")
    print(f"ratio         {ours / theirs:8.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
