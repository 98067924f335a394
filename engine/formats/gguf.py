"""GGUF reader for llama-architecture files.

4-bit blocks (Q4_0, Q4_1, Q4_K) become Q4Linear layers without re-quantizing: each block of 32 values is
one group whose scale and offset reproduce ggml's formula exactly. Other types (F32, F16, BF16, Q8_0,
Q5_K, Q6_K) are dequantized to float32 here and cast by the loader. The Q and K projections are stored
with rows permuted for llama.cpp's rotary layout; we undo that so the model can use HF's layout.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelError
from ..quant import Q4Linear
from ..tokenizer import load_from_gguf
from . import Checkpoint

QK = 32  # values per block in the legacy formats (Q4_0, Q4_1, Q8_0)
QK_K = 256  # values per super-block in the k-quants


def _f16(block_bytes: np.ndarray) -> np.ndarray:
    """Little-endian fp16 stored as two bytes -> float32 column."""
    return block_bytes.copy().view(np.float16).astype(np.float32)


def _legacy_nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block hold 32 values: the low nibbles are values 0..15, the high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales_and_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte field of Q4_K / Q5_K into 8 six-bit scales and 8 six-bit mins."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


# Each 4-bit decoder returns (q [rows, blocks, values], scale [rows, blocks], offset [rows, blocks]) with
# value = scale * q + offset, every block one group of size values.
def _q4_0(blocks):
    d = _f16(blocks[..., 0:2])[..., 0]
    return _legacy_nibbles(blocks[..., 2:18]), d, -8.0 * d


def _q4_1(blocks):
    d = _f16(blocks[..., 0:2])[..., 0]
    m = _f16(blocks[..., 2:4])[..., 0]
    return _legacy_nibbles(blocks[..., 4:20]), d, m


def _q4_k(blocks):
    rows, n = blocks.shape[:2]
    d = _f16(blocks[..., 0:2])
    dmin = _f16(blocks[..., 2:4])
    sc, mn = _k_scales_and_mins(blocks[..., 4:16])
    # 128 bytes as four chunks of 32: low nibbles are sub-block 2j, high nibbles sub-block 2j+1.
    qs = blocks[..., 16:144].reshape(rows, n, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, n * 8, 32)
    scale = (d * sc).reshape(rows, n * 8)
    offset = -(dmin * mn).reshape(rows, n * 8)
    return q, scale, offset


FOUR_BIT = {"Q4_0": (_q4_0, 18, QK), "Q4_1": (_q4_1, 20, QK), "Q4_K": (_q4_k, 144, QK_K)}


def _q8_0(blocks):
    d = _f16(blocks[..., 0:2])
    return d * blocks[..., 2:34].view(np.int8).astype(np.float32)


def _q5_k(blocks):
    rows, n = blocks.shape[:2]
    d = _f16(blocks[..., 0:2])
    dmin = _f16(blocks[..., 2:4])
    sc, mn = _k_scales_and_mins(blocks[..., 4:16])
    qh = blocks[..., 16:48]
    qs = blocks[..., 48:176].reshape(rows, n, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, n, 8, 32)
    # Bit b of qh[l] is the fifth bit of value l in sub-block b.
    high = np.stack([(qh >> b) & 1 for b in range(8)], axis=2)
    q = (low | (high << 4)).astype(np.float32)
    return (d * sc)[..., None] * q - (dmin * mn)[..., None]


def _q6_k(blocks):
    rows, n = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(rows, n, 2, 64)
    qh = blocks[..., 128:192].reshape(rows, n, 2, 32)
    scales = blocks[..., 192:208].view(np.int8).astype(np.float32).reshape(rows, n, 2, 4, 2)
    d = _f16(blocks[..., 208:210]).reshape(rows, n, 1, 1, 1)
    # Each half of 128 values: four runs of 32, low 4 bits from ql, high 2 bits from qh.
    low = [ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4]
    q = np.stack([lo | (((qh >> (2 * i)) & 3) << 4) for i, lo in enumerate(low)], axis=3)
    q = q.astype(np.float32).reshape(rows, n, 2, 4, 2, 16) - 32
    return (d[..., None] * scales[..., None] * q).reshape(rows, n * QK_K)


DENSE = {"Q8_0": (_q8_0, 34, QK), "Q5_K": (_q5_k, 176, QK_K), "Q6_K": (_q6_k, 210, QK_K)}


def _blocks(tensor, block_bytes: int, block_values: int) -> np.ndarray:
    rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
    cols = int(tensor.shape[0])
    return np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // block_values, block_bytes)


def dequantize_tensor(tensor) -> np.ndarray:
    """Any supported tensor as float32 in numpy order [rows, cols] (GGUF lists shapes innermost first)."""
    kind = tensor.tensor_type.name
    shape = tuple(int(s) for s in reversed(tensor.shape))
    if kind in ("F32", "F16"):
        return np.asarray(tensor.data).astype(np.float32).reshape(shape)
    if kind == "BF16":
        raw = np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    if kind in FOUR_BIT:
        decode, size, values = FOUR_BIT[kind]
        q, scale, offset = decode(_blocks(tensor, size, values))
        return (scale[..., None] * q.astype(np.float32) + offset[..., None]).reshape(shape)
    if kind in DENSE:
        decode, size, values = DENSE[kind]
        return decode(_blocks(tensor, size, values)).reshape(shape)
    raise ModelError(f"tensor {tensor.name} has type {kind}, which this engine cannot read")


def four_bit_linear(tensor) -> Q4Linear:
    """A 4-bit GGUF weight [out, in] as a Q4Linear, exactly (each block is one group)."""
    decode, size, values = FOUR_BIT[tensor.tensor_type.name]
    q, scale, offset = decode(_blocks(tensor, size, values))
    out_features = q.shape[0]
    q = torch.from_numpy(q.reshape(out_features, -1).astype(np.uint8)).t()
    scale = torch.from_numpy(np.ascontiguousarray(scale.reshape(out_features, -1).T))
    offset = torch.from_numpy(np.ascontiguousarray(offset.reshape(out_features, -1).T))
    return Q4Linear.from_values(q.contiguous(), scale, offset, group_size=QK)  # k-quant sub-blocks are 32 too


def _rope_rows(heads: int, out_features: int) -> torch.Tensor:
    """Row order that turns llama.cpp's interleaved rotary layout back into HF's half-split one."""
    head_dim = out_features // heads
    return torch.arange(out_features).view(heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def _permute_rows(weight, rows: torch.Tensor):
    if isinstance(weight, Q4Linear):
        # Output rows of W are columns of the transposed packed form.
        return Q4Linear(weight.packed[:, rows], weight.scale[:, rows], weight.offset[:, rows], weight.group_size)
    return weight[rows]


NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LINEAR_PARTS = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}


def _hf_name(name: str) -> str | None:
    if name in NAMES:
        return NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None  # e.g. rope_freqs, which we compute ourselves


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def open_gguf(path: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as error:  # the gguf package raises many kinds for a damaged file
        raise ModelError(f"{path}: not a readable GGUF file ({error})") from None


def read_config(reader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture", "unknown")
    if arch != "llama":
        raise ModelError(f"{path}: architecture {arch!r} is not supported; this engine runs llama-architecture GGUF files")
    p = "llama."
    try:
        hidden = int(_field(reader, p + "embedding_length"))
        heads = int(_field(reader, p + "attention.head_count"))
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = _field(reader, p + "vocab_size") or (len(tokens.data) if tokens else None)
        rope_scaling = None
        scaling_type = _field(reader, p + "rope.scaling.type")
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(_field(reader, p + "rope.scaling.factor"))}
        eos = _field(reader, "tokenizer.ggml.eos_token_id")
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(_field(reader, p + "feed_forward_length")),
            num_layers=int(_field(reader, p + "block_count")),
            num_heads=heads,
            num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
            head_dim=int(_field(reader, p + "rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(_field(reader, p + "context_length", 4096)),
            tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [int(eos)],
        )
    except (TypeError, ValueError):
        raise ModelError(f"{path}: the llama settings in the GGUF metadata are missing or malformed") from None


def read_gguf(path: str) -> Checkpoint:
    reader = open_gguf(path)
    config = read_config(reader, path)
    size = os.path.getsize(path)
    weights = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelError(f"{path}: tensor {tensor.name} runs past the end of the file; the file is truncated")
        part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if part in LINEAR_PARTS and tensor.tensor_type.name in FOUR_BIT:
            weight = four_bit_linear(tensor)
        else:
            try:
                weight = torch.from_numpy(dequantize_tensor(tensor))
            except ModelError as error:  # it names the tensor and type; the user also needs the file
                raise ModelError(f"{path}: {error}") from None
        if part == "attn_q":
            weight = _permute_rows(weight, _rope_rows(config.num_heads, config.num_heads * config.head_dim))
        elif part == "attn_k":
            weight = _permute_rows(weight, _rope_rows(config.num_kv_heads, config.num_kv_heads * config.head_dim))
        weights[name] = weight
    return Checkpoint(config, weights, tokenizer_source=path, tokenizer=load_from_gguf(reader))
