"""Perplexity over consecutive non-overlapping windows, the way llama.cpp and ExLlama report it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .loader import LoadedModel


@torch.inference_mode()
def window_nll(loaded: LoadedModel, ids: list[int], ctx: int) -> tuple[float, int]:
    """Summed negative log-likelihood and count of predicted tokens over all full windows of `ctx` tokens."""
    if ctx < 2 or ctx > loaded.max_seq_len:
        raise ValueError(f"--ctx must be between 2 and the model's context of {loaded.max_seq_len}")
    total, count = 0.0, 0
    for start in range(0, len(ids) - ctx + 1, ctx):
        window = torch.tensor([ids[start:start + ctx]], device=loaded.device)
        logits = loaded.model(window, 0, last_only=False)[0, :-1].float()
        total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += ctx - 1
    return total, count


def perplexity(loaded: LoadedModel, ids: list[int], ctx: int) -> float:
    total, count = window_nll(loaded, ids, ctx)
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    return math.exp(total / count)
