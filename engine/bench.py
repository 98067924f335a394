"""Prompt-processing and decode speed of a loaded model, measured through the real generator."""

from __future__ import annotations

import statistics
import time

import torch

from .generator import Generator
from .loader import LoadedModel
from .sampling import SamplingSettings, draw


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loaded: LoadedModel, prompt_len: int = 128, new_tokens: int = 128, runs: int = 5,
            adapters: dict[str, float] | None = None) -> dict:
    """Median tokens/s over `runs` runs after one warm-up, with these LoRA adapters applied; every run starts
    from an empty cache."""
    generator = Generator(loaded)
    rng = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, loaded.config.vocab_size, (prompt_len,), generator=rng).tolist()
    greedy = SamplingSettings(temperature=0)
    prompt_rates, decode_rates = [], []
    for run in range(runs + 1):
        generator.cached = []
        _sync(loaded.device)
        started = time.perf_counter()
        generator.prefill(prompt, adapters)
        _sync(loaded.device)
        prompt_seconds = time.perf_counter() - started
        stream = generator.generate(prompt, greedy, max_new_tokens=new_tokens, stop_on_eos=False, adapters=adapters)
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
        "kv_cache": loaded.kv_cache,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prompt_tok_s": round(statistics.median(prompt_rates), 2),
        "decode_tok_s": round(statistics.median(decode_rates), 2),
        "decode_runs": [round(r, 2) for r in decode_rates],
    }


def copy_bandwidth(device: torch.device, size: int = 1 << 30, runs: int = 10) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read and the bytes written."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size / statistics.median(times) / 1e9


def weight_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes a decode step must read: every weight once, except the embedding, of which it reads one row."""
    model = loaded.model
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for m in model.modules() if getattr(m, "kernel", None) for t in (m.kernel.weights, m.kernel.scales)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    embedding = model.embed_tokens
    return total - (embedding.shape[0] - 1) * embedding[0].numel() * embedding.element_size()


def decode_rate(generator: Generator, context: int, new_tokens: int, runs: int, adapters=None) -> float:
    """Median tokens/s of greedy decoding after a random context of `context` tokens (no detokenizing)."""
    loaded = generator.loaded
    rng = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, loaded.config.vocab_size, (context,), generator=rng).tolist()
    greedy = SamplingSettings(temperature=0)
    rates = []
    for run in range(runs + 1):
        generator.cached = []
        logits, _ = generator.prefill(prompt, adapters)
        history = list(prompt)
        _sync(loaded.device)
        started = time.perf_counter()
        for _ in range(new_tokens):  # as Generator._run decodes: each step queued before its token is read
            logits, token_id = generator._forward_drawn(draw(logits, history, greedy, None), len(history))
            history.append(token_id)
        _sync(loaded.device)
        if run:
            rates.append(new_tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def prompt_rate(generator: Generator, length: int, runs: int) -> float:
    loaded = generator.loaded
    prompt = torch.randint(0, loaded.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    rates = []
    for run in range(runs + 1):
        generator.cached = []
        _sync(loaded.device)
        started = time.perf_counter()
        generator.prefill(prompt)
        _sync(loaded.device)
        if run:
            rates.append(length / (time.perf_counter() - started))
    return statistics.median(rates)


CONTEXTS = (128, 2048, 8192)
PROMPT_LEN = 2048


def measure_synthetic(name: str, group_size: int = 128, new_tokens: int = 64, runs: int = 3,
                      kv_cache: str = "full") -> dict:
    """The issue-5 figures for one synthetic shape: 4-bit and fp16 models measured in the same run. The 4-bit
    model's KV cache is of kind `kv_cache`; the fp16 model, the baseline, always keeps a full one."""
    from .synthetic import synthetic_model

    device = torch.device("cuda")
    result = {"model": name, "gpu": torch.cuda.get_device_name(device), "group_size": group_size,
              "kv_cache": kv_cache, "copy_gbs": round(copy_bandwidth(device), 1)}
    for label, bits in (("q4", 4), ("fp16", None)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        loaded = synthetic_model(name, device, bits=bits, group_size=group_size, max_seq_len=max(CONTEXTS),
                                 kv_cache=kv_cache if bits == 4 else "full")
        generator = Generator(loaded)
        figures = {
            "bytes_per_token": weight_bytes_per_token(loaded),
            "decode_tok_s": {str(c): round(decode_rate(generator, c - new_tokens, new_tokens, runs), 1)
                             for c in CONTEXTS},
            "prompt_tok_s": round(prompt_rate(generator, PROMPT_LEN, runs), 1),
            "vram_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
        }
        figures["roofline_pct"] = round(
            figures["decode_tok_s"]["128"] * figures["bytes_per_token"] / (result["copy_gbs"] * 1e9) * 100, 1)
        if bits == 4:
            result.update(figures)
        else:
            result["fp16"] = figures
        del generator, loaded
    result["vram_gb_2048"] = peak_vram_gb(name, group_size, VRAM_GOAL_CONTEXT, new_tokens, kv_cache)
    return result


VRAM_GOAL_CONTEXT = 2048  # the VRAM goal is for a cache of this many tokens


def peak_vram_gb(name: str, group_size: int, context: int, new_tokens: int, kv_cache: str = "full") -> float:
    """Peak GB allocated by a 4-bit synthetic model with a `kv_cache` cache of `context` tokens, from loading it
    through a prompt that fills the cache but for `new_tokens`, which it then decodes."""
    from .synthetic import synthetic_model

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    loaded = synthetic_model(name, device, bits=4, group_size=group_size, max_seq_len=context, kv_cache=kv_cache)
    decode_rate(Generator(loaded), context - new_tokens, new_tokens, runs=1)
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2)


LORA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def measure_lora_cost(name: str, rank: int = 16, group_size: int = 128, new_tokens: int = 64, runs: int = 3) -> dict:
    """Decode speed of a synthetic 4-bit model at context 128 with a random rank-`rank` adapter on all seven
    projections of every block, applied (graphs captured with it, as in the chat) and not applied.

    Both are measured on one generator, alternating run by run: on an H200 every graph replays ~10% slower
    once a second set of graphs has been captured (bench/NOTES.md), so comparing a first generator against
    a later one would charge that to the adapter."""
    from .lora import LowRankUpdate, layer_shape
    from .synthetic import synthetic_model

    device = torch.device("cuda")
    loaded = synthetic_model(name, device, bits=4, group_size=group_size, max_seq_len=1024)
    generator = torch.Generator(device=device).manual_seed(0)
    updates = []
    for index in range(len(loaded.model.layers)):
        for projection in LORA_PROJECTIONS:
            path = f"layers.{index}.{projection}"
            in_features, out_features = layer_shape(loaded.model, path)
            a = torch.randn(rank, in_features, device=device, generator=generator) * in_features**-0.5
            b = torch.randn(out_features, rank, device=device, generator=generator) * 0.01
            updates.append(LowRankUpdate(path, index, a, b, scale=2.0))
    loaded.adapters.add("random", updates, "random factors")
    decoder = Generator(loaded)
    context = 128 - new_tokens
    rates: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(runs):
        for label, adapters in (("without", None), ("with", {"random": 1.0})):
            rates[label].append(decode_rate(decoder, context, new_tokens, 1, adapters=adapters))
    without, with_lora = statistics.median(rates["without"]), statistics.median(rates["with"])
    return {"model": name, "gpu": torch.cuda.get_device_name(device), "lora_rank": rank,
            "projections": len(LORA_PROJECTIONS), "decode_tok_s_without": round(without, 1),
            "decode_tok_s_with": round(with_lora, 1), "cost_pct": round((1 - with_lora / without) * 100, 1)}


def measure_samples(loaded: LoadedModel, counts, context: int, steps: int = 32, runs: int = 3) -> dict:
    """Decode step time with n samples continuing one shared context, for each n in `counts`: shared-prefix
    (bifurcated) attention, against a replicated cache that copies the context's keys and values for every
    sample, in the same run. The samples' last step is at position `context`; "OOM" where a run does not fit."""
    if not steps < context <= loaded.max_seq_len:
        raise ValueError(f"--ctx must be above {steps} and at most the model's context of {loaded.max_seq_len}")
    shared = context - steps
    prompt = torch.randint(0, loaded.config.vocab_size, (shared,), generator=torch.Generator().manual_seed(0))
    Generator(loaded, use_graphs=False).prefill(prompt.tolist())
    cuda = loaded.device.type == "cuda"
    result = {"model": loaded.name, "device": torch.cuda.get_device_name(loaded.device) if cuda else "cpu",
              "context": context, "shared_tokens": shared, "steps": steps, "step_ms": {}, "peak_gb": {}}
    for label, step_seconds in (("bifurcated", _bifurcated_step_seconds), ("replicated", _replicated_step_seconds)):
        measured = {str(count): _unless_oom(step_seconds, loaded, shared, count, steps, runs) for count in counts}
        result["step_ms"][label] = {count: ms for count, (ms, _) in measured.items()}
        result["peak_gb"][label] = {count: gb for count, (_, gb) in measured.items()}
    bifurcated = result["step_ms"]["bifurcated"]
    if isinstance(bifurcated.get("1"), float):
        result["bifurcated_vs_1"] = {n: round(ms / bifurcated["1"], 2) for n, ms in bifurcated.items()
                                     if isinstance(ms, float)}
    return result


def _unless_oom(step_seconds, loaded: LoadedModel, *args) -> tuple[float | str, float | None]:
    """Milliseconds per step, or "OOM", and the peak GB of GPU memory allocated (None on the CPU)."""
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(loaded.device)
    try:
        ms = round(step_seconds(loaded, *args) * 1000, 3)
    except torch.cuda.OutOfMemoryError:
        ms = "OOM"
    # The failed run's tensors went with its frames at the end of the except clause: hand their memory back.
    torch.cuda.empty_cache()
    return ms, round(torch.cuda.max_memory_allocated(loaded.device) / 1e9, 2) if cuda else None


def _median_step_seconds(run, device: torch.device, steps: int, runs: int) -> float:
    """Median over `runs` of `run()`'s time per step, after one warm-up run (which captures the graphs)."""
    times = []
    for attempt in range(runs + 1):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        if attempt:
            times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def _bifurcated_step_seconds(loaded: LoadedModel, shared: int, samples: int, steps: int, runs: int) -> float:
    from .parallel import SharedPrefixDecoder

    decoder = SharedPrefixDecoder(loaded)
    tokens = torch.zeros(samples, dtype=torch.long)  # on the CPU, as ParallelGenerator passes them

    def run():
        decoder.start(shared, samples, steps)
        for _ in range(steps):
            decoder.step(tokens)

    return _median_step_seconds(run, loaded.device, steps, runs)


@torch.inference_mode()
def _replicated_step_seconds(loaded: LoadedModel, shared: int, samples: int, steps: int, runs: int) -> float:
    """The same decode steps with the model's own attention over a batch cache: the context copied per sample."""
    from .cache import KVCache
    from .parallel import capture_graph

    model, config = loaded.model, loaded.config
    contexts = [layer.self_attn.cache for layer in model.layers]
    length = shared + steps
    hidden = model.embed(torch.zeros(samples, 1, dtype=torch.long))
    position = torch.full((1,), shared, dtype=torch.long, device=loaded.device)
    try:
        for layer, context in zip(model.layers, contexts):
            cache = KVCache(config.num_kv_heads, config.head_dim, length, loaded.dtype, context.keys.data.device,
                            samples)
            cache.keys.data[:, :, :shared] = context.keys.read(shared)
            cache.values.data[:, :, :shared] = context.values.read(shared)
            layer.self_attn.cache = cache

        def step():
            return model.step(hidden, position, length)

        if loaded.device.type == "cuda" and len(model.segments) == 1:
            graph, _ = capture_graph(step, loaded.device)
            step = graph.replay

        def run():
            for t in range(steps):
                position.fill_(shared + t)
                step()

        return _median_step_seconds(run, loaded.device, steps, runs)
    finally:
        for layer, context in zip(model.layers, contexts):
            layer.self_attn.cache = context
