"""Small random PEFT LoRA adapters for the tests that choose adapters in the chat: the server side
(test_webui_lora.py) and the browser (test_browser.py)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.loader import resolve
from engine.split import checkpoint_shapes

TARGETS = ("q_proj", "v_proj", "down_proj")


def target_shapes(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """target -> (its module inside a block, in features, out features)."""
    return {
        "q_proj": ("self_attn", config.hidden_size, config.num_heads * config.head_dim),
        "v_proj": ("self_attn", config.hidden_size, config.num_kv_heads * config.head_dim),
        "down_proj": ("mlp", config.intermediate_size, config.hidden_size),
    }


def default_model_config() -> ModelConfig:
    """The default model's hyper-parameters, from its file's metadata without loading its weights."""
    return checkpoint_shapes(resolve("default"), None)[0]


def write_adapter(folder: Path, config: ModelConfig, seed: int) -> str:
    """A PEFT LoRA folder (rank 4) with random factors big enough to change what the model says. Written
    directly rather than through peft, which needs the 15 s HF reference model; tests/test_lora.py checks
    that the engine reads peft's own files the way peft applies them. Only the shapes come from the model,
    so a browser test can write adapters before its server loads the model."""
    generator = torch.Generator().manual_seed(seed)
    shapes = target_shapes(config)
    tensors = {}
    for block in range(config.num_layers):
        for target in TARGETS:
            part, in_features, out_features = shapes[target]
            key = f"base_model.model.model.layers.{block}.{part}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, in_features, generator=generator) / in_features ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator) * 0.25
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(TARGETS), "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return str(folder)
