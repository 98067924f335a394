"""Quantized KV caches (--kv-cache q8, k8v4, q4) on the CPU: the stored bits against a decoder written here from
the layout's description, what a cache reads back, and what the quantizing costs the default model in
perplexity. The GPU kernels that write and read the same layout are checked in test_cuda_fused.py."""

import math
import os

import numpy as np
import pytest
import torch

import engine
from engine.__main__ import main
from engine.cache import KV_CACHE_KINDS, QUANT_GROUP, KVCache, dequantize, quantize
from engine.evaluate import perplexity
from test_hf_format import llama_tensors, write_folder

TEXT_FILE = os.path.join(os.path.dirname(__file__), "data", "ppl_text.txt")


def decode_bits(data: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """The layout, read entry by entry: byte j of a vector is entry j at 8 bits; at 4 bits its low nibble is
    entry j and its high nibble entry j + dim / 2. Group g (entries 32 g ..) has (scale, minimum) at scales[g]."""
    vectors = data.reshape(-1, data.shape[-1])
    groups = scales.reshape(vectors.shape[0], -1, 2).astype(np.float64)
    dim = vectors.shape[1] * 8 // bits
    out = np.zeros((vectors.shape[0], dim))
    for v, vector in enumerate(vectors):
        for j, byte in enumerate(vector):
            entries = [(j, int(byte))] if bits == 8 else [(j, int(byte) & 0xF), (j + dim // 2, int(byte) >> 4)]
            for entry, level in entries:
                scale, minimum = groups[v, entry // QUANT_GROUP]
                out[v, entry] = minimum + scale * level
    return out.reshape(*data.shape[:-1], dim)


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_bits_decode_to_the_nearest_level(bits):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 5, 128, generator=generator) * torch.linspace(0.1, 20, 128)  # channels of unlike range
    x[0, 0, 0, :32] = 1.5  # a constant group: scale 0, every entry the minimum
    data, scales = quantize(x, bits)
    assert data.dtype == torch.uint8 and data.shape == (2, 3, 5, 128 * bits // 8)
    assert scales.dtype == torch.float16 and scales.shape == (2, 3, 5, 128 // QUANT_GROUP, 2)
    decoded = decode_bits(data.numpy(), scales.float().numpy(), bits)
    ours = dequantize(data, scales, bits, torch.float32).double().numpy()
    np.testing.assert_allclose(ours, decoded, rtol=1e-6, atol=1e-6)
    # Each entry lies within half a level (plus the float16 rounding of the minimum) of what it stood for.
    groups = x.double().numpy().reshape(2, 3, 5, -1, QUANT_GROUP)
    scale = scales[..., 0].double().numpy()[..., None]
    error = np.abs(decoded.reshape(groups.shape) - groups)
    assert (error <= scale / 2 + np.abs(groups).max(-1, keepdims=True) * 2**-10 + 1e-6).all()
    assert decoded[0, 0, 0, :32] == pytest.approx(np.full(32, 1.5))


@pytest.mark.parametrize("kind", [k for k in KV_CACHE_KINDS if k != "full"])
def test_a_quantized_cache_reads_back_what_was_written_last(kind):
    generator = torch.Generator().manual_seed(0)
    cache = KVCache(2, 64, 16, torch.float32, "cpu", kind=kind)
    first = torch.randn(1, 2, 10, 64, generator=generator)
    cache.write(first, first * 2, torch.arange(10), 10)
    rewritten = torch.randn(1, 2, 3, 64, generator=generator)
    keys, values = cache.write(rewritten, rewritten * 2, torch.arange(4, 7), 8)  # a rewind: slots 4-6 again
    expected = torch.cat((first[:, :, :4], rewritten, first[:, :, 7:8]), dim=2)
    key_bits, value_bits = KV_CACHE_KINDS[kind]
    assert keys.shape == values.shape == (1, 2, 8, 64)
    assert torch.equal(keys, dequantize(*quantize(expected, key_bits), key_bits, torch.float32))
    assert torch.equal(values, dequantize(*quantize(expected * 2, value_bits), value_bits, torch.float32))
    assert (keys - expected).abs().max() < expected.abs().max() / (2 ** key_bits - 1)


@pytest.fixture(scope="module")
def text_ids():
    model = engine.load_model("default", device="cpu", dtype=torch.float32)
    with open(TEXT_FILE, encoding="utf-8") as f:
        return model.tokenizer.encode(f.read(), add_bos=False)


@pytest.fixture(scope="module")
def full_perplexity(text_ids):
    return perplexity(engine.load_model("default", device="cpu", dtype=torch.float32), text_ids, 512)


# What each kind may cost the default model (SmolLM2-135M, float32, 512-token windows). Keys are the sensitive
# part: a 135M model loses more to a 4-bit cache than the 7B ones it is meant for.
PERPLEXITY_COST = {"q8": 0.005, "k8v4": 0.015, "q4": 0.06}


@pytest.mark.parametrize("kind", PERPLEXITY_COST)
def test_perplexity_cost_of_each_kind(kind, text_ids, full_perplexity):
    loaded = engine.load_model("default", device="cpu", dtype=torch.float32, kv_cache=kind)
    assert loaded.kv_cache == kind
    ours = perplexity(loaded, text_ids, 512)
    assert full_perplexity <= ours * (1 + 1e-3)  # no free lunch: the cache only loses information
    assert ours / full_perplexity - 1 <= PERPLEXITY_COST[kind], (ours, full_perplexity)


def test_decoding_after_a_prompt_reads_its_cache():
    """Token-by-token decode over an 8-bit cache that a prompt filled gives the logits of the whole sequence
    run at once over a full cache, but for the quantizing: a slot read or written in the wrong place would
    not. Exact equality is not to be had even against the same kind: float noise between a batched and a
    one-row product can move an entry across a rounding boundary, a whole level."""
    full = engine.load_model("default", device="cpu", dtype=torch.float32)
    q8 = engine.load_model("default", device="cpu", dtype=torch.float32, kv_cache="q8")
    ids = torch.tensor([full.tokenizer.encode("The capital of France is Paris, and the capital of Spain is")])
    with torch.inference_mode():
        whole = full.model(ids, 0, last_only=False)[0, 4:]
        q8.model(ids[:, :4], 0)
        steps = torch.stack([q8.model(ids[:, i:i + 1], i)[0, -1] for i in range(4, ids.shape[1])])
    assert torch.equal(steps.argmax(-1), whole.argmax(-1))
    # Measured with the default model: the quantizing and float noise came to 0.018 of the largest logit on one
    # machine and 0.022 on another; a slot one off either way, to 0.74 and 0.88.
    assert (steps - whole).abs().max() < 0.05 * whole.abs().max()


def test_a_head_size_the_quantized_cache_cannot_take_is_one_error_line(tmp_path, capsys):
    write_folder(tmp_path, llama_tensors(torch.float32))  # heads of 16 entries
    status = main(["generate", "-d", str(tmp_path), "--device", "cpu", "--kv-cache", "q8", "--prompt", "Hi"])
    stderr = capsys.readouterr().err
    assert status == 2 and len(stderr.splitlines()) == 1, stderr
    assert "--kv-cache q8" in stderr and "multiple of 64" in stderr and "--kv-cache full" in stderr


def test_quantized_caches_are_smaller_by_their_bits():
    sizes = {}
    for kind in KV_CACHE_KINDS:
        cache = KVCache(8, 128, 1024, torch.float16, "cpu", kind=kind)
        sizes[kind] = cache.nbytes
    per_entry = {kind: size / (2 * 8 * 128 * 1024) for kind, size in sizes.items()}
    assert per_entry == {"full": 2, "q8": 1.125, "k8v4": math.fsum([1.125, 0.625]) / 2, "q4": 0.625}


def test_decode_attention_splits_short_contexts_to_fill_the_gpu():
    from engine.cuda.fused import MAX_SPLITS, attention_splits

    # Llama-2-7B (32 KV heads) on 132 multiprocessors. A 256-slot bucket holds 4 blocks of 64 slots: 4 splits,
    # though two programs per multiprocessor would take 9.
    assert attention_splits(32, 1, 256, 132) == 4
    assert attention_splits(32, 1, 1024, 132) == 9  # 2 * 132 / 32 programs per KV head, rounded up
    assert attention_splits(32, 1, 8192, 132) == 32  # long contexts: a split per 256 slots
    assert attention_splits(1, 1, 8192, 132) == MAX_SPLITS  # one KV head: never more than the merge expects
    assert attention_splits(32, 4, 8192, 132) == 8  # many row blocks fill the GPU with fewer splits
    assert attention_splits(8, 1, 64, 132) == 1
