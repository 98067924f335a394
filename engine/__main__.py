"""Command line: `python -m engine generate|ppl|bench ...`.

Problems a user can fix end the program with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .errors import ModelError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--model", default="default",
                        help="model folder (HF or GPTQ safetensors), GGUF file, or 'default'")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight and activation dtype (default: float16)")
    parser.add_argument("--quantize", type=int, choices=[4], default=None,
                        help="quantize an unquantized checkpoint to 4 bits (group 128) while loading")
    parser.add_argument("--max-seq-len", type=int, default=None, help="context length to allocate the cache for")
    parser.add_argument("--lora", type=lora_folder, action="append", default=[], metavar="[NAME=]DIR",
                        help="PEFT LoRA adapter folder to apply, repeatable; NAME defaults to the folder's name")
    parser.add_argument("--lora-weight", type=lora_weight, action="append", default=[], metavar="NAME=W",
                        help="weight of the adapter NAME (default 1.0)")
    add_gpu_split_argument(parser)
    add_kv_cache_argument(parser)


def add_kv_cache_argument(parser: argparse.ArgumentParser) -> None:
    from .cache import KV_CACHE_KINDS

    parser.add_argument("--kv-cache", choices=list(KV_CACHE_KINDS), default="full",
                        help="how keys and values are cached: full (the model's dtype), q8 (8 bits), k8v4 (8-bit "
                             "keys, 4-bit values) or q4 (4 bits); fewer bits fit longer contexts and decode faster "
                             "there, at some cost in accuracy (default: full)")


def add_gpu_split_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-split", metavar="GIB,GIB,...|auto", default=None,
                        help="spread the layers over the GPUs: GiB each may use, in order (weights, KV cache and "
                             "buffers all count), or 'auto' for their free memory")


def lora_folder(spec: str) -> tuple[str, str]:
    """`NAME=DIR`, or a plain DIR (which may itself contain '=') named after its last folder."""
    name, equals, folder = spec.partition("=")
    if not equals or os.path.isdir(spec):
        return os.path.basename(os.path.normpath(spec)), spec
    return name, folder


def lora_weight(spec: str) -> tuple[str, float]:
    name, _, weight = spec.partition("=")
    try:
        return name, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not NAME=NUMBER, e.g. style=0.5") from None


def adapter_mix(args) -> dict[str, float]:
    """Every --lora adapter at weight 1.0 unless --lora-weight says otherwise."""
    return {name: 1.0 for name, _ in args.lora} | dict(args.lora_weight)


def load(args):
    from .loader import load_model

    return load_model(args.model, device=args.device, dtype=DTYPES.get(args.dtype), quantize=args.quantize,
                      max_seq_len=args.max_seq_len, lora=args.lora, gpu_split=args.gpu_split, kv_cache=args.kv_cache)


def run_generate(args) -> None:
    from .generator import Generator
    from .sampling import SamplingSettings

    loaded = load(args)
    tokenizer = loaded.tokenizer
    if args.raw:
        prompt_ids = tokenizer.encode(args.prompt, add_bos=tokenizer.add_bos)
    else:
        prompt_ids = tokenizer.encode_chat(tokenizer.render_chat([{"role": "user", "content": args.prompt}]))
    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                min_p=args.min_p, seed=args.seed)
    stream = Generator(loaded).generate(prompt_ids, settings, max_new_tokens=args.max_new_tokens,
                                        adapters=adapter_mix(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def run_ppl(args) -> None:
    from .evaluate import perplexity

    try:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ModelError(f"{args.text_file}: cannot read the text file ({error.strerror})") from None
    loaded = load(args)
    loaded.adapters.activate(adapter_mix(args))
    ids = loaded.tokenizer.encode(text)
    print(f"tokens: {len(ids)}, windows of {args.ctx}: {len(ids) // args.ctx}", file=sys.stderr)
    print(f"perplexity: {perplexity(loaded, ids, args.ctx):.4f}")


def run_bench(args) -> None:
    from .bench import measure, measure_lora_cost, measure_samples, measure_synthetic

    if args.synthetic and not torch.cuda.is_available():
        raise ModelError("--synthetic benchmarks need a CUDA GPU")
    if args.samples:
        result = measure_samples(samples_model(args), args.samples, args.ctx, runs=args.runs)
    elif args.synthetic:
        if args.lora_rank:
            result = measure_lora_cost(args.synthetic, rank=args.lora_rank, group_size=args.group_size, runs=args.runs)
        else:
            result = measure_synthetic(args.synthetic, group_size=args.group_size, runs=args.runs,
                                       kv_cache=args.kv_cache)
    else:
        result = measure(load(args), prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs,
                         adapters=adapter_mix(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def samples_model(args):
    """The model for `bench --samples`: the synthetic one with a context of --ctx, or -d's."""
    if not args.synthetic:
        return load(args)
    from .synthetic import synthetic_model

    return synthetic_model(args.synthetic, "cuda", group_size=args.group_size, max_seq_len=args.ctx,
                           kv_cache=args.kv_cache)


def sample_counts(spec: str) -> list[int]:
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not a list of sample counts, e.g. 1,4,16") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError("every sample count must be at least 1")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="stream a reply to a prompt")
    add_model_arguments(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.set_defaults(run=run_generate)

    ppl = commands.add_parser("ppl", help="perplexity over non-overlapping windows of a text file")
    add_model_arguments(ppl)
    ppl.add_argument("--text-file", required=True)
    ppl.add_argument("--ctx", type=int, default=512)
    ppl.set_defaults(run=run_ppl)

    bench = commands.add_parser("bench", help="prompt and decode speed")
    add_model_arguments(bench)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--synthetic", metavar="NAME", default=None,
                       help="a random-weight model of a known shape instead of -d: llama2-7b, llama3-8b, llama2-70b")
    bench.add_argument("--group-size", type=int, default=128, help="4-bit group size of the synthetic model")
    bench.add_argument("--lora-rank", type=int, default=0,
                       help="with --synthetic: the decode cost of a random adapter of this rank on all 7 projections")
    bench.add_argument("--samples", type=sample_counts, default=None, metavar="N,N,...",
                       help="decode step time with N parallel samples after one shared context, bifurcated "
                            "attention against a replicated cache")
    bench.add_argument("--ctx", type=int, default=8192, help="with --samples: the context length")
    bench.add_argument("--json", action="store_true", help="last line of stdout is one JSON object")
    bench.set_defaults(run=run_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
