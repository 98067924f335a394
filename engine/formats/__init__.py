"""Checkpoint readers. Each turns files on disk into one `Checkpoint`: the model's settings and its
weights under HF Llama names, with every linear weight either a dense tensor [out, in] or a Q4Linear."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..quant import Q4Linear


@dataclass
class Checkpoint:
    config: ModelConfig
    # "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
    # "lm_head.weight" (absent when tied), ...: a Tensor, or a Q4Linear for 4-bit linear layers.
    weights: dict[str, torch.Tensor | Q4Linear]
    # Where the tokenizer comes from: a folder with tokenizer.json / tokenizer.model, or a GGUF path.
    tokenizer_source: str
    # Chat template and special-token settings found next to the weights (tokenizer_config.json or GGUF).
    tokenizer_settings: dict = field(default_factory=dict)
    # A ready Tokenizer when the checkpoint file embeds its vocabulary (GGUF), so the file is parsed once.
    tokenizer: object | None = None
