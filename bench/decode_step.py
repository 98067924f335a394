"""Where a graph-captured decode step's time goes, for a synthetic model on CUDA.

    python bench/decode_step.py [--model llama2-7b] [--contexts 128 8192] [--kv-cache full] [--times-only]

For each context it prints three times per step:
- loop: the bench's decode loop (host sampling, the token's way in, the replay), as `engine bench` times it;
- replay: back-to-back replays of the step's graph, timed with events: the GPU's share;
- kernels: the sum of the step's kernel durations from the PyTorch profiler,
and then the kernels by name, with their launches and microseconds per step (not with --times-only, which
A/B runs of two trees use). loop - replay is host time that the GPU waits for; replay - kernels is the gaps
between kernels inside the graph.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.bench import decode_rate  # noqa: E402
from engine.generator import Generator  # noqa: E402
from engine.synthetic import synthetic_model  # noqa: E402

STEPS = 64


def loop_ms(generator: Generator, context: int) -> float:
    """The bench's own decode loop (engine.bench.decode_rate) after `context` tokens, per step."""
    return 1e3 / decode_rate(generator, context, STEPS, runs=3)


def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STEPS):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / STEPS)
    return statistics.median(times)


def kernel_table(graph: torch.cuda.CUDAGraph, replays: int = 10):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    launches, micros = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type.name == "CUDA":
            name = event.name[:70]
            launches[name] += 1
            micros[name] += event.device_time_total
    return {name: (launches[name] / replays, micros[name] / replays) for name in launches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 8192])
    parser.add_argument("--kv-cache", default="full")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--times-only", action="store_true", help="print loop and replay times, not the kernels")
    args = parser.parse_args()
    loaded = synthetic_model(args.model, torch.device("cuda"), bits=4, group_size=args.group_size,
                             max_seq_len=max(args.contexts) + STEPS, kv_cache=args.kv_cache)
    generator = Generator(loaded)
    for context in args.contexts:
        loop = loop_ms(generator, context)  # its warm-up run captures the bucket's graph
        graph = next(graphs for key, graphs in generator.graphs.graphs.items() if key[0] >= context + STEPS)[0][0]
        replay = replay_ms(graph)
        if args.times_only:
            print(f"{args.model} {args.kv_cache} context {context}: loop {loop:.4f} ms, replay {replay:.4f} ms")
            continue
        table = kernel_table(graph)
        kernels = sum(us for _, us in table.values()) / 1e3
        print(f"\n{args.model} {args.kv_cache} context {context}: loop {loop:.3f} ms, replay {replay:.3f} ms, "
              f"kernels {kernels:.3f} ms, launches {sum(n for n, _ in table.values()):.0f}")
        for name, (count, us) in sorted(table.items(), key=lambda item: -item[1][1]):
            print(f"  {us:8.1f} us {count:5.0f}x  {name}")


if __name__ == "__main__":
    main()
