"""Decode speed of synthetic models split over two GPUs (issue 7), one JSON object per line.

    python bench/multi_gpu.py [--context 128] [--new-tokens 64] [--runs 3]

llama2-7b, 4-bit g128: on cuda:0 alone, then half its layers on each GPU; the split's speed as a share of
one GPU's. llama2-70b, 4-bit g128: half its layers on each GPU; tokens/s and % of the roofline, which
is the copy bandwidth of one GPU over the bytes a token reads, since the GPUs take their turns. For each
split the planned bytes per GPU beside the peak PyTorch allocated there.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.bench import copy_bandwidth, decode_rate, weight_bytes_per_token  # noqa: E402
from engine.generator import Generator  # noqa: E402
from engine.split import GiB, Footprint  # noqa: E402
from engine.synthetic import synthetic_config, synthetic_model, weight_shapes  # noqa: E402

MAX_SEQ_LEN = 2048


def half_split(name: str) -> tuple[str, Footprint]:
    """A --gpu-split giving GPU 0 room for the first half of the layers, and the footprint it came from."""
    config = synthetic_config(name)
    footprint = Footprint.of(config, weight_shapes(config), MAX_SEQ_LEN)
    first = footprint.share(0, range(config.num_layers // 2), True, False).total
    return f"{first / GiB + 0.001},1000", footprint


def measure(loaded, args) -> dict:
    rate = decode_rate(Generator(loaded), args.context, args.new_tokens, args.runs)
    return {"decode_tok_s": round(rate, 1), "bytes_per_token": weight_bytes_per_token(loaded)}


def split_report(loaded, footprint: Footprint) -> list[dict]:
    segments = loaded.model.segments
    report = []
    for i, s in enumerate(segments):
        planned = footprint.share(s.device.index, s.layers, i == 0, i == len(segments) - 1).total
        report.append({"device": str(s.device), "layers": f"{s.layers.start}-{s.layers.stop - 1}",
                       "planned_gib": round(planned / GiB, 2),
                       "peak_allocated_gib": round(torch.cuda.max_memory_allocated(s.device) / GiB, 2)})
    return report


def release() -> None:
    gc.collect()
    for device in range(torch.cuda.device_count()):
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=128, help="tokens before the timed decode")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    copy_gbs = []
    for index in range(2):
        with torch.cuda.device(index):  # copy_bandwidth's events record on the current device's stream
            copy_gbs.append(round(copy_bandwidth(torch.device("cuda", index)), 1))
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "copy_gbs": copy_gbs}), flush=True)

    release()
    one = measure(synthetic_model("llama2-7b", "cuda:0", max_seq_len=MAX_SEQ_LEN), args)
    release()
    spec, footprint = half_split("llama2-7b")
    loaded = synthetic_model("llama2-7b", max_seq_len=MAX_SEQ_LEN, gpu_split=spec)
    two = measure(loaded, args)
    print(json.dumps({"model": "llama2-7b q4 g128", "one_gpu": one, "split": two, "gpu_split": spec,
                      "split_vs_one_pct": round(100 * two["decode_tok_s"] / one["decode_tok_s"], 1),
                      "placement": split_report(loaded, footprint)}), flush=True)
    del loaded
    release()

    spec, footprint = half_split("llama2-70b")
    loaded = synthetic_model("llama2-70b", max_seq_len=MAX_SEQ_LEN, gpu_split=spec)
    figures = measure(loaded, args)
    roofline = figures["decode_tok_s"] * figures["bytes_per_token"] / (min(copy_gbs) * 1e9)
    print(json.dumps({"model": "llama2-70b q4 g128", "split": figures, "gpu_split": spec,
                      "roofline_pct": round(100 * roofline, 1), "placement": split_report(loaded, footprint)}),
          flush=True)


if __name__ == "__main__":
    main()
