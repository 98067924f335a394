"""Models with random weights in well-known shapes, built on the device without touching the disk.

Speed depends only on shapes and formats, not on what the weights say, so these let the benchmark
measure a 7B or 70B model on any GPU with enough memory.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import ModelError
from .loader import LoadedModel, prepare_linears
from .model import Transformer, embedding_device
from .quant import Q4Linear
from .split import Footprint, WeightShape, gpu_budgets, plan_split

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


def weight_shapes(config: ModelConfig, bits: int | None = 4, group_size: int = 128) -> dict[str, WeightShape]:
    """Every weight of the synthetic model and its form on the GPU; group_size <= 0 means one group per column."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    linears = {"self_attn.q_proj": (q_out, hidden), "self_attn.k_proj": (kv_out, hidden),
               "self_attn.v_proj": (kv_out, hidden), "self_attn.o_proj": (hidden, q_out),
               "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
    shapes = {"model.embed_tokens.weight": WeightShape((config.vocab_size, hidden)),
              "lm_head.weight": WeightShape((config.vocab_size, hidden)),
              "model.norm.weight": WeightShape((hidden,))}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = WeightShape((hidden,))
        shapes[prefix + "post_attention_layernorm.weight"] = WeightShape((hidden,))
        for part, (out_features, in_features) in linears.items():
            group = (group_size if group_size > 0 else in_features) if bits == 4 else 0
            shapes[f"{prefix}{part}.weight"] = WeightShape((out_features, in_features), group)
    return shapes


def _random_q4(out_features: int, in_features: int, group_size: int, device, generator) -> Q4Linear:
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
                    max_seq_len: int = 8192, gpu_split: str | None = None, kv_cache: str = "full") -> LoadedModel:
    """A model of shape `name` with random weights: 4-bit linear layers, or float16 with bits=None, and a KV
    cache of kind `kv_cache`.

    `gpu_split` spreads the layers over the CUDA GPUs instead of using `device`, as load_model's does.
    """
    config = synthetic_config(name)
    shapes = weight_shapes(config, bits, group_size)
    placement = None
    if gpu_split is not None:
        placement = plan_split(Footprint.of(config, shapes, max_seq_len, kv_cache=kv_cache), gpu_budgets(gpu_split))
    # Every weight is drawn from one generator on one device, so a split model has the very same weights.
    drawn_on = placement.first_device if placement else torch.device(device)
    generator = torch.Generator(device=drawn_on).manual_seed(0)
    table_device = embedding_device(drawn_on, tied="lm_head.weight" not in shapes)
    weights = {}
    for weight_name, weight in shapes.items():
        if weight_name == "model.embed_tokens.weight" and table_device != drawn_on:
            # A table kept in CPU memory is drawn there, from a generator of its own: it never takes GPU memory.
            weights[weight_name] = _random_dense(*weight.shape, table_device, torch.Generator().manual_seed(0))
            continue
        if len(weight.shape) == 1:
            tensor = torch.ones(weight.shape, device=drawn_on, dtype=torch.float16)
        elif weight.group_size:
            tensor = _random_q4(*weight.shape, weight.group_size, drawn_on, generator)
        else:
            tensor = _random_dense(*weight.shape, drawn_on, generator)
        weights[weight_name] = tensor.to(placement.device_of(weight_name)) if placement else tensor
    model = Transformer(config, weights).eval()
    prepare_linears(model, drawn_on, torch.float16)
    model.setup_cache(max_seq_len, torch.float16, kv_cache)
    label = f"{name} {'4-bit g' + str(group_size) if bits == 4 else 'fp16'}"
    # As load_model's: the device of a split model is the last GPU, where the logits come out.
    device = placement.last_device if placement else drawn_on
    return LoadedModel(label, "synthetic", config, model, None, device, torch.float16, max_seq_len, kv_cache)
