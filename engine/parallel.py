"""Several samples continuing one prompt at once, with shared-prefix (bifurcated) attention.

The prompt is prefilled once by the ordinary generator into the model's own KV cache, so prefix reuse
across chat turns works as it does for one sample. The samples then decode as one batch whose steps read
the prompt's keys and values once for all of them (SharedPrefixCache), so while the context dominates the
memory traffic, n samples cost little more than one. Each sample draws with its own random generator and
stops on its own terms; finished samples leave the batch whenever it can halve.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .cache import SharedPrefixCache
from .errors import ModelError
from .generator import GenerationResult, Generator, Sample, SampleDecoding
from .graphs import EmbeddedTokens, bucket_for
from .loader import LoadedModel

SMALLEST_OWN_BUCKET = 32  # own slots a graph reads at least; each doubling needs one more graph


class SharedPrefixDecoder:
    """Decode steps of a batch of samples after a context that the model's KV cache holds.

    Owns one SharedPrefixCache per layer, swapped into the model only while a step runs, so the model is
    left as the single-sample generator expects between steps. On one CUDA GPU each step is replayed from a
    graph captured once per (rows, context slots, own slots, whether LoRA adapters apply), the slot counts
    rounded up to powers of two; a model split over GPUs runs eagerly.
    """

    def __init__(self, loaded: LoadedModel, use_graphs: bool = True):
        self.model = loaded.model
        self.max_seq_len = loaded.max_seq_len
        self.device = loaded.device
        self.caches: list[SharedPrefixCache] = []  # allocated for the largest batch asked for so far
        self.context_len = 0
        self.position = 0  # where the next step's tokens go
        self.graphed = use_graphs and loaded.device.type == "cuda" and len(self.model.segments) == 1
        self.adapters = loaded.adapters  # whether any is applied decides which graph a step replays
        # (rows, context slots, own slots, with adapters) -> graph and its output
        self.graphs: dict[tuple[int, int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # one memory pool for all graphs: they never run at the same time
        self.tokens: EmbeddedTokens | None = None  # the graphs' inputs: each row's token, and the position
        self.positions: torch.Tensor | None = None
        self.own_slot: torch.Tensor | None = None  # the own slot of the step, for every layer's cache

    @torch.inference_mode()
    def start(self, context_len: int, rows: int, capacity: int) -> None:
        """Begin `rows` samples after the first context_len cached positions, each for up to `capacity` steps."""
        contexts = [layer.self_attn.cache for layer in self.model.layers]
        fits = (len(self.caches) == len(contexts) and rows <= self.caches[0].keys.shape[0]
                and capacity <= self.caches[0].keys.shape[2]
                and all(cache.context is context for cache, context in zip(self.caches, contexts)))
        if not fits:
            # The graphs read the old buffers: they go too, before the new buffers take the memory.
            self.caches, self.graphs, self.pool = [], {}, None
            self.own_slot = torch.zeros(1, dtype=torch.long, device=self.device)
            self.caches = [SharedPrefixCache(context, rows, capacity, self.own_slot) for context in contexts]
            self.tokens = EmbeddedTokens(self.model, rows)
            self.positions = torch.zeros(1, dtype=torch.long, device=self.device)
        for cache in self.caches:
            cache.start(context_len)
        self.context_len, self.position = context_len, context_len

    @torch.inference_mode()
    def keep_rows(self, rows: list[int]) -> None:
        """Go on with only these batch rows, moved to the front in this order."""
        for cache in self.caches:
            cache.keep_rows(rows)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] after each row's token (tokens [rows], on the CPU) at the next position. The
        returned tensor may be overwritten by the next step."""
        own_len = self.position - self.context_len + 1
        capacity = self.caches[0].keys.shape[2]
        if own_len > capacity:
            raise ValueError(f"the samples' own caches hold {capacity} tokens; start() asked for too few")
        self.own_slot.fill_(own_len - 1)
        if self.graphed:
            own_slots = min(max(SMALLEST_OWN_BUCKET, 1 << (own_len - 1).bit_length()), capacity)
            logits = self._replay(tokens, bucket_for(self.context_len, self.max_seq_len), own_slots)
        else:
            positions = torch.tensor([self.position], device=self.device)
            logits = self._forward(self.model.embed(tokens.view(-1, 1)), positions, self.context_len, own_len)
        self.position += 1
        return logits

    def _forward(self, hidden, positions, context_slots: int, own_slots: int) -> torch.Tensor:
        layers = self.model.layers
        for layer, cache in zip(layers, self.caches):
            cache.context_slots, cache.own_slots = context_slots, own_slots
            layer.self_attn.cache = cache
        try:
            # cache_len only shapes the model's single-cache bias, which SharedPrefixCache does not use.
            return self.model.step(hidden, positions, context_slots + own_slots)[:, -1]
        finally:
            for layer, cache in zip(layers, self.caches):
                layer.self_attn.cache = cache.context

    def _replay(self, tokens: torch.Tensor, context_slots: int, own_slots: int) -> torch.Tensor:
        rows = tokens.shape[0]
        self.tokens.write(tokens)
        self.positions.fill_(self.position)
        key = (rows, context_slots, own_slots, bool(self.adapters.mix))
        if key not in self.graphs:
            # The warm-up runs write this very step's keys and values, so the caches stay right.
            self.graphs[key] = self._capture(rows, context_slots, own_slots)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _capture(self, rows: int, context_slots: int, own_slots: int):
        def step():
            return self._forward(self.tokens.hidden(rows), self.positions, context_slots, own_slots)

        graph, logits = capture_graph(step, self.device, self.pool)
        self.pool = graph.pool()
        return graph, logits


def capture_graph(run, device: torch.device, pool=None):
    """A CUDA graph of `run()` on `device`, and the output it replays into; `pool` shares graph memory.

    `run` is called three times (two warm-ups, then the capture), so it must be safe to repeat."""
    with torch.cuda.device(device):
        # Warm up on a side stream first, as CUDA graph capture requires, then record.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            output = run()
    return graph, output


class SampleEvent(NamedTuple):
    index: int  # which sample, in the order they were asked for
    text: str  # the next piece of that sample's text; may be empty on its last event
    finished: bool  # the sample's last event: its GenerationResult is now in ParallelGeneration.results


class ParallelGeneration:
    """One request's stream of SampleEvents; `results[i]` is filled in when sample i finishes."""

    def __init__(self, count: int, run):
        self.results: list[GenerationResult | None] = [None] * count
        self._events = run(self.results)

    def __iter__(self):
        return self._events


class ParallelGenerator:
    """n samples from one prompt: the single-sample generator's prefill and cache, then one batched decode."""

    def __init__(self, generator: Generator, use_graphs: bool = True):
        self.generator = generator
        self.decoder = SharedPrefixDecoder(generator.loaded, use_graphs)

    def generate(self, prompt_ids: list[int], samples: Sequence[Sample], stop_on_eos: bool = True,
                 cancel: threading.Event | None = None,
                 adapters: dict[str, float] | None = None) -> ParallelGeneration:
        if not samples:
            raise ValueError("ask for at least one sample")
        prompt_ids, samples = list(prompt_ids), list(samples)
        run = self._run_one if len(samples) == 1 else self._run  # the single-sample path is tuned for one
        return ParallelGeneration(len(samples),
                                  lambda results: run(prompt_ids, samples, stop_on_eos, cancel, adapters, results))

    def _run_one(self, prompt_ids, requests, stop_on_eos, cancel, adapters, results):
        (request,) = requests
        stream = self.generator.generate(prompt_ids, request.settings, request.max_new_tokens, request.stop_strings,
                                         stop_on_eos, cancel, adapters)
        for piece in stream:
            yield SampleEvent(0, piece, False)
        results[0] = stream.result
        yield SampleEvent(0, "", True)

    def _run(self, prompt_ids, requests, stop_on_eos, cancel, adapters, results):
        started = time.perf_counter()
        logits, reused = self.generator.prefill(prompt_ids, adapters)
        prompt_seconds = time.perf_counter() - started
        eos = set(self.generator.tokenizer.eos_ids) if stop_on_eos else set()
        decodings = [SampleDecoding(request, prompt_ids, self.generator, eos) for request in requests]
        for decoding in decodings:
            decoding.result.reused_tokens, decoding.result.prompt_seconds = reused, prompt_seconds
        # A sample's last token is never fed back, and none can go past the context.
        room = self.generator.max_seq_len - len(prompt_ids)
        capacity = max(1, min(max(request.max_new_tokens for request in requests), room))
        try:
            self.decoder.start(len(prompt_ids), len(requests), capacity)
        except torch.cuda.OutOfMemoryError:
            raise ModelError(f"{len(requests)} samples of up to {capacity} tokens each do not fit in GPU memory; "
                             "ask for fewer or shorter ones") from None
        rows = list(range(len(requests)))  # the sample each batch row decodes
        logits = logits.expand(len(rows), -1)  # every sample starts from the prompt's logits
        started = time.perf_counter()
        while True:
            cancelled = cancel is not None and cancel.is_set()
            for row, index in enumerate(rows):
                decoding = decodings[index]
                if decoding.finished:
                    continue
                text = decoding.cancel() if cancelled else decoding.advance(logits[row])
                if decoding.finished:
                    decoding.result.decode_seconds = time.perf_counter() - started
                    results[index] = decoding.result
                if text or decoding.finished:
                    yield SampleEvent(index, text, decoding.finished)
            running = [index for index in rows if not decodings[index].finished]
            if not running:
                return
            rows = self._shrink(rows, running)
            # Rows of finished samples still run until the batch halves; they repeat their last token.
            logits = self.decoder.step(torch.tensor([decodings[index].history[-1] for index in rows]))

    def _shrink(self, rows: list[int], running: list[int]) -> list[int]:
        """The rows of the next step: the same, or half as many (or fewer) once the running samples fit.
        Power-of-two sizes keep the number of CUDA graphs small."""
        size = 1 << (len(running) - 1).bit_length()
        if size >= len(rows):
            return rows
        kept = running + [index for index in rows if index not in running][: size - len(running)]
        self.decoder.keep_rows([rows.index(index) for index in kept])
        return kept
