"""Hugging Face model folders: config.json plus one or more .safetensors files, dense or GPTQ.

Dense weights stay in the dtype they were saved in (float16, bfloat16 or float32); the model loader
casts them once it knows the target device. GPTQ linear layers become Q4Linear through gptq.py.
Every tensor the config implies is checked for presence and shape here, so a mismatched checkpoint
fails at load time with the file and tensor named, not deep inside a matmul.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from ..config import ModelConfig
from ..errors import ModelError
from . import Checkpoint, gptq
from .safetensors_io import TensorInfo, read_header, read_tensor

INDEX_FILE = "model.safetensors.index.json"
DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def read_hf_folder(folder: str) -> Checkpoint:
    """Read a model folder; any problem raises ModelError naming the file at fault."""
    if not os.path.isdir(folder):
        raise ModelError(f"{folder}: no such folder")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ModelError(f"{folder}: config.json is missing; point at a Hugging Face model folder")
    hf = _read_json(config_path)
    config = ModelConfig.from_hf(hf, config_path)
    tensors, where = _tensor_index(folder)

    settings = _gptq_settings(folder, hf, config_path)
    if settings is None and any(name.endswith(".qweight") for name in tensors):
        # GPTQ tensors without a settings file: the shapes tell everything but the zero-point format,
        # and the classic one is by far the most common.
        settings = gptq.GPTQSettings(config_path, None, "gptq")

    weights = {}
    for name, shape in _expected_shapes(config).items():
        prefix = name.removesuffix(".weight")
        if settings is not None and f"{prefix}.qweight" in tensors:
            weight = gptq.load_linear(tensors, prefix, settings)
            found, what = (weight.out_features, weight.in_features), f"GPTQ layer {prefix}"
            path = tensors[f"{prefix}.qweight"].path
        else:
            weight = _read_dense(tensors, name, where)
            found, what, path = tuple(weight.shape), f"tensor {name}", tensors[name].path
        if found != shape:
            raise ModelError(
                f"{path}: {what} has shape {list(found)} but config.json implies {list(shape)}; "
                f"the weights do not belong to this config"
            )
        if _is_linear(name):
            _check_no_bias(tensors, prefix)
        weights[name] = weight
    return Checkpoint(config, weights, folder, _tokenizer_settings(folder))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            parsed = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err}); fix or download the file again") from None
    if not isinstance(parsed, dict):
        raise ModelError(f"{path}: expected a JSON object; fix or download the file again")
    return parsed


def _tensor_index(folder: str) -> tuple[dict[str, TensorInfo], str]:
    """Where each tensor lives (the shards named by the index file, or every .safetensors file), and
    the file to name when a tensor is missing."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        where = index_path
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index_path}: the weight_map entry is missing; download the file again")
        files = [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.isfile(path):
                shard = os.path.basename(path)
                raise ModelError(f"{index_path}: shard {shard} is missing from the folder; download it")
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise ModelError(f"{folder}: no .safetensors files; this engine reads safetensors, not .bin or .pt")
        where = files[0] if len(files) == 1 else os.path.join(folder, "*.safetensors")

    tensors = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise ModelError(f"{path}: tensor {name} is also in {tensors[name].path}; remove the extra file")
            tensors[name] = info
    return tensors, where


def _gptq_settings(folder: str, hf: dict, config_path: str) -> gptq.GPTQSettings | None:
    """GPTQ settings from config.json's `quantization_config` or quantize_config.json, if either exists."""
    if isinstance(hf.get("quantization_config"), dict):
        return gptq.parse_settings(hf["quantization_config"], config_path)
    quantize_path = os.path.join(folder, "quantize_config.json")
    if os.path.isfile(quantize_path):
        return gptq.parse_settings(_read_json(quantize_path), quantize_path)
    return None


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama model with this config needs, under its HF name."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for n in range(config.num_layers):
        layer = f"model.layers.{n}"
        shapes |= {
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.self_attn.q_proj.weight": (q_rows, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def _read_dense(tensors: dict[str, TensorInfo], name: str, where: str) -> torch.Tensor:
    info = tensors.get(name)
    if info is None:
        raise ModelError(f"{where}: tensor {name} is missing; the checkpoint is incomplete or not a Llama model")
    if info.dtype not in DENSE_DTYPES:
        raise ModelError(f"{info.path}: tensor {name} is {info.dtype}; expected float16, bfloat16 or float32")
    return read_tensor(info)


def _check_no_bias(tensors: dict[str, TensorInfo], prefix: str) -> None:
    """Llama linears have no bias. GPTQ tools save an all-zero one anyway, which is safe to drop."""
    info = tensors.get(f"{prefix}.bias")
    if info is not None and bool(read_tensor(info).any()):
        raise ModelError(
            f"{info.path}: tensor {prefix}.bias is nonzero, but Llama layers have no bias; "
            f"this model is not a plain Llama and is not supported"
        )


def _tokenizer_settings(folder: str) -> dict:
    """tokenizer_config.json, with the chat template from chat_template.jinja where newer tools put it."""
    config_path = os.path.join(folder, "tokenizer_config.json")
    settings = _read_json(config_path) if os.path.isfile(config_path) else {}
    template_path = os.path.join(folder, "chat_template.jinja")
    if "chat_template" not in settings and os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            settings["chat_template"] = f.read()
    return settings
