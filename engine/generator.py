"""Streaming generation over one model and its KV cache.

The generator remembers which tokens its cache holds. A new prompt that shares a prefix with them only
processes the rest, so a chat turn costs its new tokens, and a shorter prompt simply rewinds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .graphs import GraphedDecoder
from .loader import LoadedModel
from .sampling import DrawnToken, SamplingSettings, draw, sample
from .tokenizer import IncrementalDecoder

# Prompt tokens per forward pass, which bounds activation memory on long prompts. On a GPU a 4-bit layer
# dequantizes its weights once per pass for cuBLAS, which a larger chunk spreads over more tokens; the CPU
# path's attention holds every score of a chunk in memory.
PREFILL_CHUNK = {"cpu": 512, "cuda": 2048}


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""  # "eos" | "stop_string" | "max_new_tokens" | "cancelled" | "context_full"
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.decode_seconds if self.decode_seconds > 0 else 0.0


class StopStringFilter:
    """Holds back text that could still turn into a stop string, so nothing shown is ever retracted."""

    def __init__(self, stop_strings):
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text that is safe to show now; sets `stopped` once a stop string has appeared."""
        self.pending += piece
        hits = [self.pending.find(s) for s in self.stop_strings if s in self.pending]
        if hits:
            self.stopped = True
            safe, self.pending = self.pending[: min(hits)], ""
            return safe
        held = max((self._overlap(s) for s in self.stop_strings), default=0)
        cut = len(self.pending) - held
        safe, self.pending = self.pending[:cut], self.pending[cut:]
        return safe

    def _overlap(self, stop: str) -> int:
        """Length of the longest end of `pending` that is a beginning of `stop`."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest


@dataclass
class Sample:
    """How one sample is drawn, and when it ends."""

    settings: SamplingSettings
    max_new_tokens: int = 200
    stop_strings: Sequence[str] = ()

    @classmethod
    def alternatives(cls, settings: SamplingSettings, count: int, max_new_tokens: int = 200,
                     stop_strings: Sequence[str] = ()) -> list["Sample"]:
        """`count` samples alike but for their seeds (for parallel generation): a seed s becomes s, s + 1, ..., so the first sample
        is the one a single generation with seed s would give, and each is reproducible."""
        seeds = [None if settings.seed is None else settings.seed + i for i in range(count)]
        return [cls(replace(settings, seed=seed), max_new_tokens, stop_strings) for seed in seeds]



class SampleDecoding:
    """One sample's progress: its random generator, its tokens and text so far, and why it stopped."""

    def __init__(self, request: Sample, prompt_ids: list[int], generator: "Generator", eos: set[int]):
        self.request = request
        self.rng = generator._rng(request.settings)  # seeded like a single generation's
        self.decoder = IncrementalDecoder(generator.tokenizer)
        self.stops = StopStringFilter(request.stop_strings)
        self.eos = eos
        self.max_seq_len = generator.max_seq_len
        self.history = list(prompt_ids)
        self.result = GenerationResult(prompt_tokens=len(prompt_ids))

    @property
    def finished(self) -> bool:
        return bool(self.result.stop_reason)

    def advance(self, logits: torch.Tensor) -> str:
        """Draw the next token from `logits` [vocab] and take it; returns the text now safe to show (often empty)."""
        return self.accept(self.draw(logits).id())

    def draw(self, logits: torch.Tensor) -> DrawnToken:
        """The next token from `logits` [vocab], still being drawn on their device."""
        return draw(logits, self.history, self.request.settings, self.rng)

    @property
    def last_token_due(self) -> bool:
        """Whether the next token ends the sample whatever it is: it fills max_new_tokens or the context."""
        return (len(self.result.token_ids) + 1 >= self.request.max_new_tokens
                or len(self.history) + 1 >= self.max_seq_len)

    def accept(self, token: int) -> str:
        """Take the drawn token; returns the text now safe to show (often empty)."""
        if token in self.eos:
            return self._finish("eos")
        self.history.append(token)
        self.result.token_ids.append(token)
        text = self.stops.feed(self.decoder.push(token))
        self.result.text += text
        if self.stops.stopped:
            return text + self._finish("stop_string")
        if len(self.result.token_ids) >= self.request.max_new_tokens:
            return text + self._finish("max_new_tokens")
        if len(self.history) >= self.max_seq_len:
            return text + self._finish("context_full")
        return text

    def cancel(self) -> str:
        return self._finish("cancelled")

    def _finish(self, reason: str) -> str:
        """End the sample; returns the text held back in case it became a stop string, unless one did."""
        self.result.stop_reason = reason
        rest = "" if self.stops.stopped else self.stops.flush()
        self.result.text += rest
        return rest


class Generation:
    """One request's stream of text pieces; `result` is filled in when the iteration ends."""

    def __init__(self, pieces):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self):
        self.result = yield from self._pieces


class Generator:
    def __init__(self, loaded: LoadedModel, use_graphs: bool = True):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_seq_len = loaded.max_seq_len
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.cached_adapters: dict[str, float] = {}  # the adapter mix those keys and values were computed with
        graphed = use_graphs and loaded.device.type == "cuda"
        self.graphs = GraphedDecoder(self.model, self.max_seq_len) if graphed else None

    @torch.inference_mode()
    def _forward(self, ids: list[int] | torch.Tensor, start: int) -> torch.Tensor:
        """Logits after tokens `ids` placed from position `start` on. A tensor of ids may still be being drawn on the
        device (see _forward_drawn): `cached` then ends before it."""
        tokens = ids if torch.is_tensor(ids) else torch.tensor(ids)  # ids on the CPU: the model takes them to its table
        if self.graphs is not None and len(tokens) == 1:
            logits = self.graphs.step(tokens, start, with_adapters=bool(self.loaded.adapters.mix))
        else:
            logits = self.model(tokens.view(1, -1), start)[0, -1]
        self.cached = self.cached[:start] + ([] if torch.is_tensor(ids) else list(ids))
        return logits

    def _forward_drawn(self, token: DrawnToken, position: int) -> tuple[torch.Tensor, int]:
        """(logits, the token's id) after a token still being drawn on the device, placed at `position`. The step
        is queued behind the draw before the host waits for the id, so that the GPU never waits for the host."""
        logits = self._forward(token.tensor, position)
        self.cached.append(token.id())  # the step wrote its keys and values at `position`
        return logits, self.cached[-1]

    def prefill(self, prompt_ids: list[int], adapters: dict[str, float] | None = None) -> tuple[torch.Tensor, int]:
        """Logits after the prompt with these LoRA adapters applied (name -> weight), and how many of its
        tokens were already in the cache."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) > self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_seq_len}")
        adapters = self.loaded.adapters.activate(adapters)
        if adapters != self.cached_adapters:  # keys and values depend on the adapters: none of the cache fits
            self.cached, self.cached_adapters = [], adapters
        reused = 0
        limit = min(len(self.cached), len(prompt_ids) - 1)  # the last token always runs: we need its logits
        while reused < limit and self.cached[reused] == prompt_ids[reused]:
            reused += 1
        logits = None
        chunk = PREFILL_CHUNK[self.loaded.device.type]
        for start in range(reused, len(prompt_ids), chunk):
            logits = self._forward(prompt_ids[start:start + chunk], start)
        return logits, reused

    def generate(self, prompt_ids: list[int], settings: SamplingSettings, max_new_tokens: int = 200,
                 stop_strings=(), stop_on_eos: bool = True, cancel: threading.Event | None = None,
                 adapters: dict[str, float] | None = None) -> Generation:
        request = Sample(settings, max_new_tokens, stop_strings)
        return Generation(self._run(list(prompt_ids), request, stop_on_eos, cancel, adapters))

    def _run(self, prompt_ids, request: Sample, stop_on_eos, cancel, adapters):
        eos = set(self.tokenizer.eos_ids) if stop_on_eos else set()
        decoding = SampleDecoding(request, prompt_ids, self, eos)
        result = decoding.result
        started = time.perf_counter()
        logits, result.reused_tokens = self.prefill(prompt_ids, adapters)
        result.prompt_seconds = time.perf_counter() - started
        started = time.perf_counter()
        while not decoding.finished:
            if cancel is not None and cancel.is_set():
                text = decoding.cancel()
            else:
                # The step after the token runs ahead of the host (_forward_drawn) unless the token is sure to
                # end the sample. If it ends it anyway (end of sequence, a stop string), that step was wasted.
                token = decoding.draw(logits)
                if decoding.last_token_due:
                    text = decoding.accept(token.id())
                else:
                    logits, token_id = self._forward_drawn(token, len(decoding.history))
                    text = decoding.accept(token_id)
            if text:
                yield text
        result.decode_seconds = time.perf_counter() - started
        return result

    def _rng(self, settings: SamplingSettings) -> torch.Generator | None:
        """A seeded generator on the model's device, so sampling never copies the logits to the host."""
        if settings.seed is None:
            return None
        return torch.Generator(device=self.loaded.device).manual_seed(settings.seed)

    def choose(self, prompt_ids: list[int], options: list[str], settings: SamplingSettings,
               adapters: dict[str, float] | None = None) -> int:
        """Let the model continue the prompt with exactly one of `options`; return that option's index.

        Sampling is constrained to tokens that keep the continuation on the path of some option, so the
        model's own preferences pick among them (the multibot speaker choice).
        """
        encoded = [self.tokenizer.encode(option) for option in options]
        rng = self._rng(settings)
        logits, _ = self.prefill(prompt_ids, adapters)
        chosen: list[int] = []
        history = list(prompt_ids)
        while True:
            live = [i for i, ids in enumerate(encoded) if ids[: len(chosen)] == chosen]
            finished = [i for i in live if len(encoded[i]) == len(chosen)]
            if finished:
                return finished[0]
            allowed = sorted({encoded[i][len(chosen)] for i in live})
            token = sample(logits, history, settings, rng, allowed=allowed)
            chosen.append(token)
            history.append(token)
            if any(len(encoded[i]) > len(chosen) and encoded[i][: len(chosen)] == chosen for i in live):
                logits = self._forward([token], len(history) - 1)
