"""Models with random weights in well-known shapes, built on the device without touching the disk.

Speed depends only on shapes and formats, not on what the weights say, so these let the benchmark
measure a 7B or 70B model on any GPU with enough memory.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import ModelError
from .loader import LoadedModel, prepare_linears
from .model import Transformer
from .quant import Q4Linear

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, rope_theta=500000.0),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8),
}


def synthetic_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ModelError(f"unknown synthetic model {name!r}; choose one of {', '.join(SHAPES)}")
    shape = SHAPES[name]
    return ModelConfig(head_dim=shape["hidden_size"] // shape["num_heads"], max_position_embeddings=8192, **shape)


def _random_q4(out_features: int, in_features: int, group_size: int, device, generator) -> Q4Linear:
    group_size = in_features if group_size <= 0 else group_size
    groups = in_features // group_size
    packed = torch.randint(-(2**31), 2**31, (in_features // 8, out_features), dtype=torch.int32, device=device,
                           generator=generator)
    # Scales keep a random 4-bit layer's outputs near unit size, so activations stay finite in fp16.
    scale = torch.rand(groups, out_features, device=device, generator=generator) * 0.02 / in_features**0.5 + 1e-4
    offset = -7.5 * scale
    return Q4Linear(packed, scale.half(), offset.half(), group_size)


def _random_dense(out_features: int, in_features: int, device, generator) -> torch.Tensor:
    return torch.randn(out_features, in_features, device=device, dtype=torch.float16,
                       generator=generator) * in_features**-0.5


def synthetic_model(name: str, device="cuda", bits: int | None = 4, group_size: int = 128,
                    max_seq_len: int = 8192) -> LoadedModel:
    """A model of shape `name` with random weights: 4-bit linear layers, or float16 with bits=None."""
    config = synthetic_config(name)
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    hidden, inner = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    linears = {"self_attn.q_proj": (q_out, hidden), "self_attn.k_proj": (kv_out, hidden),
               "self_attn.v_proj": (kv_out, hidden), "self_attn.o_proj": (hidden, q_out),
               "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
    ones = torch.ones(hidden, device=device, dtype=torch.float16)
    weights = {"model.embed_tokens.weight": _random_dense(config.vocab_size, hidden, device, generator),
               "lm_head.weight": _random_dense(config.vocab_size, hidden, device, generator),
               "model.norm.weight": ones}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        weights[prefix + "input_layernorm.weight"] = ones
        weights[prefix + "post_attention_layernorm.weight"] = ones
        for part, (out_features, in_features) in linears.items():
            weights[f"{prefix}{part}.weight"] = (
                _random_q4(out_features, in_features, group_size, device, generator) if bits == 4
                else _random_dense(out_features, in_features, device, generator))
    model = Transformer(config, weights).eval()
    prepare_linears(model, device, torch.float16)
    model.setup_cache(max_seq_len, torch.float16)
    label = f"{name} {'4-bit g' + str(group_size) if bits == 4 else 'fp16'}"
    return LoadedModel(label, "synthetic", config, model, None, device, torch.float16, max_seq_len)
