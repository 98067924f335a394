"""Choosing the next token from logits: penalties, then temperature and the truncation samplers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch


@dataclass
class SamplingSettings:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 turns it off
    top_p: float = 1.0
    min_p: float = 0.0
    typical: float = 1.0  # locally typical sampling mass; 1 turns it off
    # ExLlama's repetition penalty: full strength on the last `sustain` tokens, then fading to none
    # over the `decay` tokens before them.
    repetition_penalty: float = 1.0
    repetition_sustain: int = 256
    repetition_decay: int = 128
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the same window
    presence_penalty: float = 0.0  # subtracted once if the token occurs in that window
    seed: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingSettings":
        """Settings from a dict such as a session file's; unknown keys are ignored, types are coerced."""
        settings = cls()
        for f in fields(cls):
            if values.get(f.name) is not None:
                kind = int if f.name in ("top_k", "repetition_sustain", "repetition_decay", "seed") else float
                setattr(settings, f.name, kind(values[f.name]))
        return settings

    def to_dict(self) -> dict:
        return asdict(self)


def repetition_weights(history: list[int], settings: SamplingSettings) -> dict[int, float]:
    """The penalty each recent token gets: its most recent occurrence decides.

    ExLlama's schedule: the full penalty on the last `sustain` tokens and the one before them, then for
    each earlier token 1/decay of the way less towards none, over `decay` tokens in all.
    """
    weights: dict[int, float] = {}
    top = settings.repetition_penalty
    window = settings.repetition_sustain + settings.repetition_decay
    for distance, token in enumerate(reversed(history[-window:] if window > 0 else [])):
        if token in weights:
            continue
        faded = distance - settings.repetition_sustain
        weights[token] = top if faded <= 0 else top + (1.0 - top) * faded / max(settings.repetition_decay, 1)
    return weights


def _to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A list as a tensor on `device`. A GPU gets it from pinned memory without waiting for its queue, where
    the next decode step may already be (DrawnToken): a copy from pageable memory would wait for that step."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)


def apply_penalties(logits: torch.Tensor, history: list[int], settings: SamplingSettings) -> torch.Tensor:
    penalized = settings.repetition_penalty != 1.0 or settings.frequency_penalty or settings.presence_penalty
    window = settings.repetition_sustain + settings.repetition_decay
    recent = history[-window:] if window > 0 else []
    if not penalized or not recent:  # the common case: no copy of the logits on every token
        return logits
    logits = logits.clone()
    if settings.repetition_penalty != 1.0:
        weights = repetition_weights(recent, settings)
        ids = _to_device(list(weights), logits.device)
        penalty = _to_device(list(weights.values()), logits.device, logits.dtype)
        chosen = logits[ids]
        logits[ids] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    if settings.frequency_penalty or settings.presence_penalty:
        # Counted with index_add_: bincount on a GPU reads the largest id back to the host, which would wait.
        counted = [token for token in recent if token < logits.numel()]
        counts = torch.zeros_like(logits).index_add_(
            0, _to_device(counted, logits.device), torch.ones(len(counted), dtype=logits.dtype, device=logits.device))
        logits -= counts * settings.frequency_penalty + (counts > 0).to(logits.dtype) * settings.presence_penalty
    return logits


def truncate(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Apply temperature and top-k / top-p / min-p / typical; removed tokens get -inf."""
    logits = logits / settings.temperature
    if 0 < settings.top_k < logits.numel():
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.min_p > 0:
        logits = logits.masked_fill(probs < settings.min_p * probs.max(), float("-inf"))
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep each token whose predecessors hold less than top_p of the mass: the top one always stays.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= settings.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if settings.typical < 1.0:
        logits = _typical(logits, settings.typical)
    return logits


def _typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the expected surprise."""
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs.nan_to_num(neginf=0.0)).sum()
    distance = (-log_probs - entropy).abs()
    order = torch.argsort(distance)
    kept_mass = probs[order].cumsum(-1)
    drop = (kept_mass - probs[order]) >= mass
    return logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))


class DrawnToken:
    """A token drawn on the logits' device, on its way to the host. On a GPU the copy is queued at once, behind
    the draw, so that `id` waits for the draw alone, not for work queued after it (the next decode step, which
    `tensor` can feed), as reading the tensor itself would."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor  # [1], the id
        self._host, self._copied = tensor, None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(tensor.device))

    def id(self) -> int:
        if self._copied is not None:
            self._copied.synchronize()
        return int(self._host)


def draw(logits: torch.Tensor, history: list[int], settings: SamplingSettings,
         rng: torch.Generator | None, allowed: list[int] | None = None) -> DrawnToken:
    """One token from the logits [vocab] of the last position, drawn on their device without waiting for it."""
    logits = apply_penalties(logits.float(), history, settings)
    if allowed is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[_to_device(allowed, logits.device)] = 0.0
        logits = logits + mask
    if settings.temperature <= 0:
        return DrawnToken(torch.argmax(logits).view(1))
    probs = torch.softmax(truncate(logits, settings), dim=-1)
    return DrawnToken(torch.multinomial(probs, 1, generator=rng))


def sample(logits: torch.Tensor, history: list[int], settings: SamplingSettings,
           rng: torch.Generator | None, allowed: list[int] | None = None) -> int:
    """One token id from the logits [vocab] of the last position."""
    return draw(logits, history, settings, rng, allowed).id()
