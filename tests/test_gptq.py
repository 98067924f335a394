"""GPTQ checkpoints: real SmolLM2 weights written in the AutoGPTQ / GPTQModel layout by a test-side
quantizer, read back through read_hf_folder, and checked against the writer's own dequantization and
against an independent bit-level decoder, so that a packing mistake cannot hide in writer and reader alike.
"""

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file, save_file

from engine.errors import ModelError
from engine.formats.gptq import to_q4linear
from engine.formats.hf import read_hf_folder
from engine.loader import default_model_path
from engine.quant import Q4Linear

VOCAB = 256  # the first rows of the embedding are enough for the reader
LAYERS = 1  # seven linear layers of every shape; more would only repeat them
LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": LAYERS, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def smollm2():
    """Float32 weights of SmolLM2's first blocks under HF names, dequantized by gguf's own code.

    GGUF lists shapes innermost first, so its [in, out] is numpy's [out, in], the HF layout. The Q and K
    rows stay in llama.cpp's rotary order: only realistic numbers matter to a checkpoint reader.
    """
    tensors = {t.name: t for t in GGUFReader(default_model_path()).tensors}

    def read(name, rows=None):
        t = tensors[name]
        return dequantize(t.data[:rows], t.tensor_type).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": read("token_embd.weight", VOCAB),
        "model.norm.weight": read("output_norm.weight"),
    }
    for n in range(LAYERS):
        for gguf_name, hf_name in LINEARS.items() | NORMS.items():
            weights[f"model.layers.{n}.{hf_name}.weight"] = read(f"blk.{n}.{gguf_name}.weight")
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    return weights


# ---- the test-side writer ------------------------------------------------------------------------


def pack_nibbles(values: np.ndarray, axis: int) -> np.ndarray:
    """Pack 4-bit values along `axis`, 8 per int32, element j of each 8 in bits 4*j."""
    v = np.moveaxis(values & 0xF, axis, -1).astype(np.uint64)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = (v << (4 * np.arange(8, dtype=np.uint64))).sum(axis=-1)
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def quantize_gptq(w, group_size, sym, act_order, checkpoint_format, rng):
    """GPTQ-style round-to-nearest of w [out, in]: the tensors as a GPTQ tool saves them, and the
    weight they stand for, computed in float64 from the integers and the float16 scales."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    groups = -(-in_features // size)
    # Act-order quantizes rows in a shuffled order, group by group, so each group's rows are scattered.
    position = rng.permutation(in_features) if act_order else np.arange(in_features)
    g_idx = (position // size).astype(np.int32)

    q = np.empty((in_features, out_features), np.int64)
    zeros = np.empty((groups, out_features), np.int64)
    scales = np.empty((groups, out_features), np.float16)
    for g in range(groups):
        rows = g_idx == g
        block = w[:, rows].T.astype(np.float64)
        if sym:
            scale = np.maximum(np.abs(block).max(axis=0), 1e-4) * 2 / 15
            zero = np.full(out_features, 8)
        else:
            low, high = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
            scale = np.maximum(high - low, 1e-4) / 15
            zero = np.round(-low / scale)
        # The classic format stores zero - 1 in 4 bits, so a zero of 0 cannot be written.
        zero = np.clip(zero, 1 if checkpoint_format == "gptq" else 0, 15).astype(np.int64)
        scales[g] = scale
        q[rows] = np.clip(np.round(block / scales[g].astype(np.float64)) + zero, 0, 15)
        zeros[g] = zero

    reference = ((q - zeros[g_idx]) * scales[g_idx].astype(np.float64)).T
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    tensors = {
        "qweight": pack_nibbles(q, axis=0),
        "qzeros": pack_nibbles(stored_zeros, axis=1),
        "scales": scales,
        "g_idx": g_idx,
    }
    return tensors, reference


def write_gptq_folder(folder, weights, *, group_size, sym, act_order, checkpoint_format="gptq",
                      settings_in="quantize_config.json", with_g_idx=True, bits=4, extra=None, seed=0):
    """Write a GPTQ model folder; returns the float64 reference [out, in] of each linear weight."""
    rng = np.random.default_rng(seed)
    tensors, references = {}, {}
    for name, w in weights.items():
        if not name.endswith("_proj.weight"):
            tensors[name] = w.astype(np.float16)
            continue
        prefix = name.removesuffix(".weight")
        quantized, references[name] = quantize_gptq(w, group_size, sym, act_order, checkpoint_format, rng)
        if not with_g_idx:
            del quantized["g_idx"]
        tensors |= {f"{prefix}.{part}": value for part, value in quantized.items()}
    tensors |= extra or {}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))

    settings = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
                "checkpoint_format": checkpoint_format}
    config = dict(CONFIG)
    if settings_in == "config.json":
        config["quantization_config"] = settings | {"quant_method": "gptq"}
    elif settings_in == "quantize_config.json":
        with open(os.path.join(folder, "quantize_config.json"), "w") as f:
            json.dump(settings, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return references


# ---- the independent decoder ---------------------------------------------------------------------


def nibbles(words: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> int64 [..., n, 8]: nibble j of each word, assembled bit by bit from its
    little-endian bytes (bit 4*j + k of the word is bit k of nibble j)."""
    bits = np.unpackbits(words.astype("<i4").view(np.uint8), bitorder="little")
    return bits.reshape(*words.shape, 8, 4).astype(np.int64) @ np.array([1, 2, 4, 8])


def decode_gptq(qweight, qzeros, scales, g_idx, checkpoint_format) -> np.ndarray:
    """The documented GPTQ layout, straight: W[o, r] = (q[r, o] - zero[g, o]) * scales[g, o], g = g_idx[r]."""
    out_features = qweight.shape[1]
    q = nibbles(qweight).transpose(0, 2, 1).reshape(-1, out_features)  # word w, nibble j -> input row 8w + j
    zeros = nibbles(qzeros).reshape(qzeros.shape[0], out_features)  # word c, nibble j -> column 8c + j
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    return ((q - zeros[g_idx]) * scales[g_idx].astype(np.float64)).T


def test_decoder_reads_nibbles_in_documented_order():
    words = np.array([0x76543210, 0xFEDCBA98 - 2**32], dtype=np.int32)
    assert nibbles(words).tolist() == [list(range(8)), list(range(8, 16))]


def dense_in_checkpoint_order(layer: Q4Linear) -> np.ndarray:
    """The Q4Linear's weight [out, in] with its input columns back in the checkpoint's order."""
    w = layer.dequantize(torch.float32)
    if layer.perm is not None:
        w = torch.empty_like(w).index_copy_(1, layer.perm, w)
    return w.double().numpy()


# ---- round trips of real weights -----------------------------------------------------------------

CASES = {
    "sym-g128-classic": dict(group_size=128, sym=True, act_order=False),
    "asym-g32-v2-in-config": dict(
        group_size=32, sym=False, act_order=False, checkpoint_format="gptq_v2", settings_in="config.json"
    ),
    "asym-g-1-classic-no-g_idx": dict(group_size=-1, sym=False, act_order=False, with_g_idx=False),
    "asym-g128-v2-no-g_idx": dict(
        group_size=128, sym=False, act_order=False, checkpoint_format="gptq_v2", with_g_idx=False
    ),
    "sym-g32-act-order-classic": dict(group_size=32, sym=True, act_order=True),
    "asym-g128-act-order-v2": dict(group_size=128, sym=False, act_order=True, checkpoint_format="gptq_v2"),
    "asym-g-1-act-order-classic": dict(group_size=-1, sym=False, act_order=True),
}


@pytest.mark.parametrize("case", CASES)
def test_gptq_round_trip_of_real_weights(tmp_path, smollm2, case):
    options = CASES[case]
    references = write_gptq_folder(tmp_path, smollm2, **options)
    files = load_file(str(tmp_path / "model.safetensors"))
    checkpoint = read_hf_folder(str(tmp_path))
    assert checkpoint.weights.keys() == smollm2.keys()
    x = torch.randn(3, 1536, generator=torch.Generator().manual_seed(0))

    for name, reference in references.items():
        prefix = name.removesuffix(".weight")
        in_features = reference.shape[1]
        g_idx = files.get(f"{prefix}.g_idx")
        if g_idx is None:
            size = in_features if options["group_size"] == -1 else options["group_size"]
            g_idx = np.arange(in_features) // size
        decoded = decode_gptq(files[f"{prefix}.qweight"], files[f"{prefix}.qzeros"], files[f"{prefix}.scales"],
                              g_idx, options.get("checkpoint_format", "gptq"))
        # The writer put down what it meant to, and the quantization is a faithful one of SmolLM2.
        np.testing.assert_array_equal(decoded, reference, err_msg=name)
        original = smollm2[name]
        assert np.linalg.norm(reference - original) < 0.2 * np.linalg.norm(original), name

        layer = checkpoint.weights[name]
        assert isinstance(layer, Q4Linear), name
        # A group of -1 puts every row in group 0, so act-order changes nothing and needs no permutation.
        assert (layer.perm is not None) == (options["act_order"] and options["group_size"] != -1), name
        # scale * q + offset is exact in float32, so the match is exact, not merely close.
        np.testing.assert_array_equal(dense_in_checkpoint_order(layer), decoded, err_msg=name)
        expected = x[:, :in_features].double() @ torch.from_numpy(decoded).T
        torch.testing.assert_close(layer(x[:, :in_features]).double(), expected, rtol=1e-5, atol=1e-4)

    assert checkpoint.weights["model.embed_tokens.weight"].dtype == torch.float16


# ---- the converter on random bits ----------------------------------------------------------------


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_converter_matches_decoder_on_random_bits(checkpoint_format):
    """Every bit pattern, including the sign bit and classic zeros of 15 (which mean 16), and groups
    of uneven size assigned to rows at random."""
    rng = np.random.default_rng(1)
    in_features, out_features, groups = 256, 48, 5
    qweight = rng.integers(-(2**31), 2**31, size=(in_features // 8, out_features), dtype=np.int64).astype(np.int32)
    qzeros = rng.integers(-(2**31), 2**31, size=(groups, out_features // 8), dtype=np.int64).astype(np.int32)
    scales = rng.normal(size=(groups, out_features)).astype(np.float16)
    g_idx = rng.permutation(np.repeat(np.arange(groups), [64, 32, 96, 16, 48])).astype(np.int32)

    layer = to_q4linear(torch.from_numpy(qweight), torch.from_numpy(qzeros), torch.from_numpy(scales),
                        torch.from_numpy(g_idx), zero_is_stored_minus_one=checkpoint_format == "gptq")
    assert layer.group_size == 16
    np.testing.assert_array_equal(dense_in_checkpoint_order(layer),
                                  decode_gptq(qweight, qzeros, scales, g_idx, checkpoint_format))


def test_classic_zero_nibble_15_means_16():
    layer = to_q4linear(torch.zeros(1, 8, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32),
                        torch.ones(1, 8, dtype=torch.float16), torch.zeros(8, dtype=torch.int32),
                        zero_is_stored_minus_one=True)
    assert layer.dequantize(torch.float32).eq(-16).all()


def test_sorted_g_idx_needs_no_permutation():
    g_idx = torch.arange(64) // 32
    layer = to_q4linear(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32),
                        torch.ones(2, 8, dtype=torch.float16), g_idx, zero_is_stored_minus_one=False)
    assert layer.perm is None and layer.group_size == 32


# ---- settings and errors -------------------------------------------------------------------------


def gptq_error(folder) -> str:
    with pytest.raises(ModelError) as err:
        read_hf_folder(str(folder))
    return str(err.value)


def test_qweight_without_settings_file_loads_as_classic_gptq(tmp_path, smollm2):
    references = write_gptq_folder(tmp_path, smollm2, group_size=64, sym=False, act_order=False,
                                   settings_in=None, with_g_idx=False)
    checkpoint = read_hf_folder(str(tmp_path))
    for name, reference in references.items():
        assert checkpoint.weights[name].group_size == 64
        np.testing.assert_array_equal(dense_in_checkpoint_order(checkpoint.weights[name]), reference)


def test_zero_bias_is_dropped_and_nonzero_bias_refused(tmp_path, smollm2):
    zero_bias = {"model.layers.0.self_attn.q_proj.bias": np.zeros(576, np.float16)}
    write_gptq_folder(tmp_path, smollm2, group_size=128, sym=True, act_order=False, extra=zero_bias)
    assert "model.layers.0.self_attn.q_proj.bias" not in read_hf_folder(str(tmp_path)).weights

    bias = {"model.layers.0.self_attn.q_proj.bias": np.full(576, 0.5, np.float16)}
    write_gptq_folder(tmp_path, smollm2, group_size=128, sym=True, act_order=False, extra=bias)
    assert gptq_error(tmp_path) == (
        f"{tmp_path}/model.safetensors: tensor model.layers.0.self_attn.q_proj.bias is nonzero, but Llama "
        f"layers have no bias; this model is not a plain Llama and is not supported"
    )


@pytest.mark.parametrize("settings_in", ["quantize_config.json", "config.json"])
def test_three_bits_is_refused(tmp_path, smollm2, settings_in):
    write_gptq_folder(tmp_path, smollm2, group_size=128, sym=True, act_order=False, bits=3, settings_in=settings_in)
    assert gptq_error(tmp_path) == f"{tmp_path}/{settings_in}: 3-bit GPTQ is not supported; use a 4-bit GPTQ model"


def test_marlin_format_is_refused(tmp_path, smollm2):
    write_gptq_folder(tmp_path, smollm2, group_size=128, sym=True, act_order=False, checkpoint_format="marlin")
    assert gptq_error(tmp_path) == (
        f"{tmp_path}/quantize_config.json: GPTQ checkpoint format 'marlin' is not supported; "
        f"use a model saved in the gptq or gptq_v2 format"
    )


def test_other_quantization_methods_are_refused(tmp_path, smollm2):
    write_gptq_folder(tmp_path, smollm2, group_size=128, sym=True, act_order=False, settings_in=None)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert gptq_error(tmp_path) == (
        f"{tmp_path}/config.json: quantization method 'awq' is not supported; use a GPTQ, GGUF or fp16/bf16 model"
    )


def test_group_size_that_does_not_match_the_tensors(tmp_path, smollm2):
    write_gptq_folder(tmp_path, smollm2, group_size=128, sym=True, act_order=False, with_g_idx=False)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    assert gptq_error(tmp_path) == (
        f"{tmp_path}/quantize_config.json: group size 32 does not match model.layers.0.self_attn.q_proj, "
        f"which has 5 groups over 576 input rows"
    )


def test_wrong_qzeros_shape(tmp_path, smollm2):
    write_gptq_folder(tmp_path, smollm2, group_size=128, sym=True, act_order=False)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.qzeros"] = tensors["model.layers.0.mlp.up_proj.qzeros"][:, :-1].copy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert gptq_error(tmp_path) == (
        f"{tmp_path}/model.safetensors: GPTQ tensor model.layers.0.mlp.up_proj.qzeros has shape [5, 191], "
        f"expected int32 [5, 192]; the checkpoint is corrupt"
    )


def test_format_key_of_some_gptqmodel_versions(tmp_path, smollm2):
    references = write_gptq_folder(tmp_path, smollm2, group_size=32, sym=False, act_order=False,
                                   checkpoint_format="gptq_v2")
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "format": "gptq_v2"}))
    checkpoint = read_hf_folder(str(tmp_path))
    for name, reference in references.items():
        np.testing.assert_array_equal(dense_in_checkpoint_order(checkpoint.weights[name]), reference)


def test_gptq_layer_of_the_wrong_size_for_config(tmp_path, smollm2):
    write_gptq_folder(tmp_path, smollm2, group_size=128, sym=True, act_order=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 1024}))
    assert gptq_error(tmp_path) == (
        f"{tmp_path}/model.safetensors: GPTQ layer model.layers.0.mlp.gate_proj has shape [1536, 576] "
        f"but config.json implies [1024, 576]; the weights do not belong to this config"
    )
