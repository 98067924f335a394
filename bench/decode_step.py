"""Where a graph-captured decode step's time goes, for a synthetic model on CUDA.

    python bench/decode_step.py [--model llama2-7b] [--contexts 128 8192] [--kv-cache full]
                                [--times-only | --timeline N]

For each context it prints two times per step:
- loop: the bench's decode loop (host sampling, the token's way in, the replay), as `engine bench` times it;
- replay: back-to-back replays of the step's graph, timed with events: the GPU's share;
and then (not with --times-only, which A/B runs of two trees use) the kernels by name from the PyTorch
profiler, per step: launches, "busy" (the sum of their durations) and "charged" (how far they move the end of
the step: each kernel, in order of start, is charged its end minus the latest end before it, if later). Under
programmatic dependent launch the kernels overlap, so busy times add up to more than the step and say little
about what to speed up; charged times add up to the profiled span, gaps included. loop - replay is host time
that the GPU waits for. --timeline N also lists the first N kernels of one step in order, which tells apart
launches of one kernel for different layers (the 4-bit products of a layer, say).
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


def charged_us(events: list[tuple[float, float, str]]) -> list[float]:
    """For kernels (start, end, name) sorted by start: how far each moves the latest end so far (its end minus the
    latest end before it, or 0), in the events' unit. They sum to the span from the first start to the last end."""
    latest_end = events[0][0] if events else 0.0
    charged = []
    for _, end, _ in events:
        charged.append(max(0.0, end - latest_end))
        latest_end = max(latest_end, end)
    return charged


def profiled_kernels(graph: torch.cuda.CUDAGraph, replays: int) -> list[tuple[float, float, str]]:
    """The kernels of `replays` back-to-back replays as (start us, end us, name), sorted by start."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return sorted((event.time_range.start, event.time_range.end, event.name[:70]) for event in prof.events()
                  if event.device_type.name == "CUDA")


def kernel_table(events: list[tuple[float, float, str]], replays: int) -> dict[str, tuple[float, float, float]]:
    """Per kernel name and step: launches, busy us and charged us (see the top of the file)."""
    launches, busy, charged = collections.Counter(), collections.Counter(), collections.Counter()
    for (start, end, name), moved in zip(events, charged_us(events)):
        launches[name] += 1
        busy[name] += end - start
        charged[name] += moved
    return {name: (launches[name] / replays, busy[name] / replays, charged[name] / replays) for name in launches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 8192])
    parser.add_argument("--kv-cache", default="full")
    parser.add_argument("--group-size", type=int, default=128)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--times-only", action="store_true", help="print loop and replay times, not the kernels")
    output.add_argument("--timeline", type=int, default=0, metavar="N", help="list the first N kernels of a step")
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
        replays = 10
        events = profiled_kernels(graph, replays)
        table = kernel_table(events, replays)
        launches, busy, charged = (sum(column) for column in zip(*table.values()))
        print(f"\n{args.model} {args.kv_cache} context {context}: loop {loop:.3f} ms, replay {replay:.3f} ms, "
              f"launches {launches:.0f}; per step: busy {busy:.1f} us, charged {charged:.1f} us")
        for name, (count, kernel_busy, kernel_charged) in sorted(table.items(), key=lambda item: -item[1][2]):
            print(f"  {kernel_charged:8.1f} us charged {kernel_busy:8.1f} us busy {count:5.0f}x  {name}")
        if args.timeline:
            step = events[len(events) - len(events) // replays:]  # the last replay's kernels
            first = step[0][0]
            print(f"  the first {args.timeline} kernels of one step: start, duration, charged (us), name")
            for (start, end, name), moved in list(zip(step, charged_us(step)))[:args.timeline]:
                print(f"  {start - first:9.2f} {end - start:7.2f} {moved:7.2f}  {name}")


if __name__ == "__main__":
    main()
