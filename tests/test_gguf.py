"""The GGUF reader against the `gguf` package's own decoders: every tensor type, the Q/K row order, errors."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from engine.errors import ModelError
from engine.formats.gguf import dequantize_tensor, four_bit_linear, read_gguf

# Inside one block of each type: the byte offsets of its floating-point fields, their width as an unsigned
# integer type, and the mask of their exponent bits. Random bytes elsewhere are valid quantized values, but a
# random float field can be inf or NaN, which no real file holds and which np.array_equal never calls equal.
FP16, BF16, FP32 = (np.uint16, 0x7C00), (np.uint16, 0x7F80), (np.uint32, 0x7F800000)
FLOAT_FIELDS = {
    T.F32: ([0], *FP32),
    T.F16: ([0], *FP16),
    T.BF16: ([0], *BF16),
    T.Q8_0: ([0], *FP16),  # d
    T.Q4_0: ([0], *FP16),  # d
    T.Q4_1: ([0, 2], *FP16),  # d, m
    T.Q4_K: ([0, 2], *FP16),  # d, dmin
    T.Q5_K: ([0, 2], *FP16),  # d, dmin
    T.Q6_K: ([208], *FP16),  # d comes last in Q6_K
}
FOUR_BIT = [T.Q4_0, T.Q4_1, T.Q4_K]
COLS = 512  # a multiple of the k-quants' 256-value super-blocks


def random_tensor_bytes(qtype, rows, cols=COLS, seed=0) -> np.ndarray:
    """Random raw data of one tensor [rows, bytes per row], every float field finite."""
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    # Types the engine cannot read are never decoded, so their bytes need no repair.
    offsets, kind, exponent = FLOAT_FIELDS.get(qtype, ([], *FP16))
    width = np.dtype(kind).itemsize
    for at in offsets:
        bits = raw[..., at:at + width].copy().view(kind)
        # All exponent bits set means inf or NaN: clearing the lowest of them leaves a large finite value.
        bits[(bits & exponent) == exponent] ^= kind(exponent & -exponent)
        raw[..., at:at + width] = bits.view(np.uint8)
    return raw.reshape(rows, -1)


def write_tensors(path, tensors: dict, arch="llama", metadata=None) -> None:
    """A GGUF file holding `tensors` {name: (raw bytes [rows, bytes per row], type)} and metadata."""
    writer = GGUFWriter(str(path), arch)
    for add, value in (metadata or {}).items():
        getattr(writer, add)(value)
    for name, (raw, qtype) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reader_tensor(path, name):
    return next(t for t in GGUFReader(str(path)).tensors if t.name == name)


@pytest.mark.parametrize("rows", [64, 96])
@pytest.mark.parametrize("qtype", list(FLOAT_FIELDS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_bit_exactly(tmp_path, qtype, rows):
    write_tensors(tmp_path / "t.gguf", {"w": (random_tensor_bytes(qtype, rows), qtype)})
    tensor = reader_tensor(tmp_path / "t.gguf", "w")
    reference = dequantize(tensor.data, tensor.tensor_type).reshape(rows, COLS)
    ours = dequantize_tensor(tensor)
    assert ours.dtype == np.float32 and ours.shape == (rows, COLS)
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("qtype", FOUR_BIT, ids=lambda t: t.name)
def test_four_bit_linear_matches_gguf_bit_exactly(tmp_path, qtype):
    write_tensors(tmp_path / "t.gguf", {"w": (random_tensor_bytes(qtype, 96), qtype)})
    tensor = reader_tensor(tmp_path / "t.gguf", "w")
    reference = dequantize(tensor.data, tensor.tensor_type).reshape(96, COLS)
    layer = four_bit_linear(tensor)
    assert (layer.out_features, layer.in_features) == (96, COLS)
    assert np.array_equal(layer.dequantize(torch.float32).numpy(), reference)


# A one-layer llama small enough to write in milliseconds, with grouped-query attention so that Q and K
# are permuted with different head counts, as llama.cpp's converter does.
HIDDEN, HEADS, KV_HEADS, FFN = 64, 4, 2, 256  # FFN: ffn_down rows fit 256-value k-quant blocks
HEAD_DIM = HIDDEN // HEADS
VOCAB = ["<|endoftext|>", "a", "b", "ab"]
LLAMA_METADATA = {
    "add_block_count": 1,
    "add_context_length": 256,
    "add_embedding_length": HIDDEN,
    "add_feed_forward_length": FFN,
    "add_head_count": HEADS,
    "add_head_count_kv": KV_HEADS,
    "add_rope_dimension_count": HEAD_DIM,
    "add_layer_norm_rms_eps": 1e-5,
    "add_tokenizer_model": "gpt2",
    "add_token_list": VOCAB,
    "add_token_types": [3, 1, 1, 1],
    "add_token_merges": ["a b"],
    "add_eos_token_id": 0,
}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split rotary rows -> llama.cpp's interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_weights(seed=0) -> dict[str, np.ndarray]:
    """Random float32 weights in HF row order, under GGUF names."""
    rng = np.random.default_rng(seed)
    shapes = {
        "token_embd.weight": (len(VOCAB), HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_llama_gguf(path, qtype=T.F32, replace=None, arch="llama") -> dict[str, np.ndarray]:
    """A tiny llama GGUF with every linear weight stored as `qtype`, Q and K permuted like llama.cpp's
    converter; `replace` swaps in raw tensors {name: (bytes, type)}. Returns the HF-order weights, each
    as the file's quantization reproduces it."""
    weights = llama_weights()
    stored, expected = {}, {}
    for name, weight in weights.items():
        kind = qtype if weight.ndim == 2 and name.startswith("blk.") else T.F32
        # Quantization works row by row, so quantizing HF order and then permuting rows stores exactly
        # what the converter would, and the dequantized HF-order rows are what a reader must give back.
        raw = quantize(weight, kind)
        expected[name] = dequantize(raw, kind).reshape(weight.shape)
        heads = {"blk.0.attn_q.weight": HEADS, "blk.0.attn_k.weight": KV_HEADS}.get(name)
        if heads:
            raw = llama_cpp_permute(raw, heads)
        stored[name] = (raw.view(np.uint8), kind)
    stored |= replace or {}
    write_tensors(path, stored, arch, LLAMA_METADATA)
    return expected


def as_dense(weight) -> np.ndarray:
    return (weight if isinstance(weight, torch.Tensor) else weight.dequantize(torch.float32)).numpy()


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
}


@pytest.mark.parametrize("qtype", [T.F32, T.Q4_0], ids=lambda t: t.name)
def test_weights_come_back_in_hf_order_with_q_and_k_unpermuted(tmp_path, qtype):
    expected = write_llama_gguf(tmp_path / "llama.gguf", qtype)
    checkpoint = read_gguf(str(tmp_path / "llama.gguf"))
    config = checkpoint.config
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert set(checkpoint.weights) == set(HF_NAMES.values())  # no output.weight: the embedding is tied
    for gguf_name, hf_name in HF_NAMES.items():
        assert np.array_equal(as_dense(checkpoint.weights[hf_name]), expected[gguf_name]), hf_name


def read_error(path) -> str:
    with pytest.raises(ModelError) as error:
        read_gguf(str(path))
    return str(error.value)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.IQ4_XS], ids=lambda t: t.name)
def test_unsupported_tensor_type_names_tensor_type_and_file(tmp_path, qtype):
    path = tmp_path / "llama.gguf"
    write_llama_gguf(path, replace={"blk.0.ffn_down.weight": (random_tensor_bytes(qtype, HIDDEN, FFN), qtype)})
    message = read_error(path)
    assert str(path) in message and "blk.0.ffn_down.weight" in message and qtype.name in message


def test_non_llama_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_llama_gguf(path, arch="gpt2")
    message = read_error(path)
    assert str(path) in message and "'gpt2'" in message and "not supported" in message


@pytest.mark.parametrize("keep", [0.5, 0.05], ids=["half", "inside-metadata"])
def test_truncated_file_is_refused_naming_it(tmp_path, keep):
    path = tmp_path / "llama.gguf"
    write_llama_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    assert str(path) in read_error(path)
