"""Time the 4-bit CUDA kernel on Llama-2-7B layer shapes against this GPU's copy bandwidth.

    python bench/q4_kernel.py [--group 128] [--rows 1 4 16] [--shapes 4096:4096 ...] [--variants default ...]
    ncu --clock-control none -k regex:matmul_kernel -s 10 -c 1 python bench/q4_kernel.py --profile 1

Copy bandwidth: a 1 GiB device-to-device copy, counting bytes read plus bytes written.
Kernel time: a CUDA graph of back-to-back launches rotating through enough weight copies to
keep them out of L2 (decode streams every weight from DRAM once per token); the median over
replays of graph time / launches, so launch gaps inside a graph are included. Bytes: prepared
weights + scales/offsets (padding included) + x + y. Random weights, random activations.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cuda import q4  # noqa: E402
from engine.quant import Q4Linear  # noqa: E402

SHAPES = [  # name, in_features, out_features
    ("q/k/v/o 4096x4096", 4096, 4096),
    ("gate/up 4096x11008", 4096, 11008),
    ("down 11008x4096", 11008, 4096),
    ("qkv fused 4096x12288", 4096, 12288),
]
VARIANTS = ["default", "x from global", "no overlap", "act-order", "group 32", "fp16 cuBLAS"]
REPLAYS = 15
LAUNCHES_PER_GRAPH = 400


def graph_time_us(launch, count: int) -> float:
    """Median microseconds per launch of `launch(i)` for i in range(count), captured in one graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            launch(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(count):
            launch(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / count)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(13):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def random_prepared(in_features, out_features, group_size, act_order) -> q4.PreparedQ4:
    groups = in_features // group_size
    packed = torch.randint(-(2**31), 2**31 - 1, (in_features // 8, out_features), dtype=torch.int32, device="cuda")
    scale = (torch.rand(groups, out_features, device="cuda") * 0.02 + 0.002).half()
    offset = (-scale.float() * torch.rand(groups, out_features, device="cuda") * 15).half()
    perm = torch.randperm(in_features, device="cuda") if act_order else None
    return q4.prepare(Q4Linear(packed, scale, offset, group_size, perm))


def copies_of(prepared: q4.PreparedQ4, count: int) -> list[q4.PreparedQ4]:
    copies = [
        dataclasses.replace(prepared, weights=prepared.weights.clone(), scales=prepared.scales.clone())
        for _ in range(count)
    ]
    torch.cuda.synchronize()  # as prepare() does: the kernel may read weights before its wait
    return copies


def weight_bytes(p: q4.PreparedQ4) -> int:
    return p.weights.numel() * 4 + p.scales.numel() * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--profile", type=int, metavar="SHAPE", help="only launch SHAPES[SHAPE] 20 times, for ncu")
    parser.add_argument("--mode", type=int, default=0)
    parser.add_argument("--shapes", nargs="+", metavar="IN:OUT", help="time these shapes instead of Llama-2-7B's")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS, help="which variants to time")
    args = parser.parse_args()
    shapes = SHAPES if not args.shapes else [(f"{s.replace(':', 'x')}", *map(int, s.split(":"))) for s in args.shapes]
    if args.profile is not None:
        _, in_features, out_features = shapes[args.profile]
        layer = random_prepared(in_features, out_features, args.group, act_order=False)
        x = torch.randn(args.rows[0], in_features, device="cuda").half()
        for _ in range(20):
            layer.matmul(x, mode=args.mode)
        torch.cuda.synchronize()
        return

    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    tiny = torch.zeros(1, device="cuda")
    empty_node_us = graph_time_us(lambda i: tiny.add_(1), LAUNCHES_PER_GRAPH)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
          f"torch {torch.__version__}")
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write); one-element kernel in a graph: "
          f"{empty_node_us:.2f} us")

    rows_table = []
    layer_us = {}
    for name, in_features, out_features in shapes:
        base = random_prepared(in_features, out_features, args.group, act_order=False)
        count = max(2, math.ceil(3 * props.L2_cache_size / weight_bytes(base)))
        launches = count * math.ceil(LAUNCHES_PER_GRAPH / count)
        plain = copies_of(base, count)
        wanted = set(args.variants)
        permuted = copies_of(random_prepared(in_features, out_features, args.group, act_order=True), count) \
            if "act-order" in wanted else None
        group32 = copies_of(random_prepared(in_features, out_features, 32, act_order=False), count) \
            if "group 32" in wanted else None
        dense = [torch.randn(out_features, in_features, device="cuda").half()
                 for _ in range(max(2, math.ceil(3 * props.L2_cache_size / (2 * in_features * out_features))))] \
            if "fp16 cuBLAS" in wanted else None
        for rows in args.rows:
            x = torch.randn(rows, in_features, device="cuda").half()
            y = torch.empty(rows, out_features, device="cuda", dtype=torch.float16)
            io_bytes = 2 * rows * (in_features + out_features)
            variants = [("default", plain, 0, True), ("x from global", plain, 1, True), ("no overlap", plain, 0, False)]
            if rows == 1:
                variants += [("act-order", permuted, 0, True), ("group 32", group32, 0, True)]
            for label, layers, mode, overlap in [v for v in variants if v[0] in wanted]:
                us = graph_time_us(lambda i: layers[i % count].matmul(x, y, mode=mode, overlap=overlap), launches)
                moved = weight_bytes(layers[0]) + io_bytes
                rows_table.append((name, rows, label, us, moved / us / 1e3, 100 * moved / us / 1e-6 / bandwidth))
                if label == "default":
                    layer_us[(name, rows)] = us
            if dense is not None:
                us = graph_time_us(lambda i: torch.matmul(x, dense[i % len(dense)].t(), out=y), launches)
                moved = 2 * in_features * out_features + io_bytes
                rows_table.append((name, rows, "fp16 cuBLAS", us, moved / us / 1e3, 100 * moved / us / 1e-6 / bandwidth))
        del plain, permuted, group32, dense
        torch.cuda.empty_cache()

    print(f"\n{'shape':<22} {'rows':>4}  {'variant':<18} {'us':>8} {'GB/s':>7} {'% copy':>7}")
    for name, rows, label, us, gbs, pct in rows_table:
        print(f"{name:<22} {rows:>4}  {label:<18} {us:>8.2f} {gbs:>7.0f} {pct:>6.1f}%")
    for rows in args.rows if shapes is SHAPES and "default" in wanted else ():
        # One Llama-2-7B block: fused qkv, o, gate, up, down; 32 blocks, linear layers only.
        block = sum(layer_us[(n, rows)] for n in (SHAPES[3][0], SHAPES[0][0], SHAPES[1][0], SHAPES[1][0], SHAPES[2][0]))
        print(f"rows {rows}: Llama-2-7B linear layers {32 * block / 1e3:.2f} ms per step "
              f"(default), {1e6 / (32 * block):.0f} steps/s")


if __name__ == "__main__":
    main()
