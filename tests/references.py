"""Models shared by the engine tests, loaded once per test run: ours and the independent HF reference."""

from __future__ import annotations

import functools
import os

import torch

import engine
from engine.loader import default_model_path


@functools.lru_cache(maxsize=None)
def our_model(dtype: torch.dtype = torch.float32) -> engine.LoadedModel:
    return engine.load_model("default", device="cpu", dtype=dtype)


@functools.lru_cache(maxsize=None)
def hf_model():
    """HF transformers reading the same GGUF file in float32: the reference for logits and perplexity."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@functools.lru_cache(maxsize=None)
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
