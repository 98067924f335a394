"""The multi-GPU planner on the CPU: the per-weight byte formula against the real layouts, metadata read
without tensors, the split rules, the memory accounting and the error messages."""

import re

import numpy as np
import pytest
import torch

import engine.loader
from engine import split
from engine.__main__ import main
from engine.cache import KV_CACHE_KINDS, KVCache
from engine.config import ModelConfig
from engine.cuda.q4 import repack
from engine.errors import ModelError
from engine.formats.hf import _expected_shapes, read_hf_folder
from engine.model import Segment, Transformer, embedding_device
from engine.quant import Q4Linear
from engine.split import GiB, Footprint, WeightShape, device_bytes, gpu_budgets, plan_split
from engine.synthetic import synthetic_config, weight_shapes
from test_gptq import CONFIG as GPTQ_CONFIG
from test_gptq import write_gptq_folder
from test_hf_format import CONFIG as HF_CONFIG
from test_hf_format import llama_tensors, write_folder


def gpus(*free_gib):
    """A stand-in for split.free_gpu_memory: GPUs with this much free memory."""
    free = [int(f * GiB) for f in free_gib]
    return lambda count: free if count is None else free[:count]


# ---- bytes of one weight -----------------------------------------------------------------------------


@pytest.mark.parametrize("out_features,in_features,group_size", [(100, 200, 40), (576, 1536, 32), (64, 64, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_device_bytes_of_a_4bit_layer_is_its_kernel_layout(out_features, in_features, group_size, act_order):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (in_features, out_features), generator=gen)
    scale = torch.rand(in_features // group_size, out_features, generator=gen)
    perm = torch.randperm(in_features, generator=gen) if act_order else None
    layer = Q4Linear.from_values(q, scale, -scale, group_size, perm)
    weights, scales = repack(layer.packed, layer.scale.half(), layer.offset.half(), group_size)
    # After use_kernel the layer keeps its int64 perm, and the kernel has an int32 copy.
    perms = 0 if perm is None else layer.perm.nbytes + in_features * 4
    expected = weights.nbytes + scales.nbytes + perms
    assert device_bytes(WeightShape((out_features, in_features), group_size, act_order), 2) == expected


def test_device_bytes_of_a_dense_tensor():
    assert device_bytes(WeightShape((100, 64)), 2) == 12800
    assert device_bytes(WeightShape((64,)), 4) == 256


def test_a_llama2_7b_layer_matches_the_kernel_notes():
    # bench/NOTES.md: 8.91 MB for a 4096 x 4096 layer and 23.9 MB for 4096 x 11008, group 128.
    footprint = Footprint.of(synthetic_config("llama2-7b"), weight_shapes(synthetic_config("llama2-7b")), 4096)
    assert footprint.layers[0] == 4 * 8_912_896 + 3 * 23_953_408 + 2 * 4096 * 2
    assert set(footprint.layers) == {footprint.layers[0]}


# ---- metadata, without reading tensors ----------------------------------------------------------------


def assert_shapes_describe(shapes, weights):
    """Every loaded weight has the planned shape, and the plan counts at least its bytes."""
    assert set(shapes) == set(weights)
    for name, weight in weights.items():
        planned = shapes[name]
        if isinstance(weight, Q4Linear):
            assert planned.shape == (weight.out_features, weight.in_features), name
            actual = WeightShape(planned.shape, weight.group_size, weight.perm is not None)
            assert device_bytes(planned, 2) >= device_bytes(actual, 2), name
        else:
            assert planned == WeightShape(tuple(weight.shape)), name


def test_gguf_metadata_gives_the_weights_the_reader_makes():
    path = engine.loader.default_model_path()  # the fidelity tests need it too
    config, shapes = split.checkpoint_shapes(path, quantize=None)
    checkpoint = engine.loader.read_checkpoint(path)
    assert config == checkpoint.config
    assert_shapes_describe(shapes, checkpoint.weights)
    assert any(s.group_size == 32 for s in shapes.values())  # Q4_1 layers stay 4-bit


@pytest.mark.parametrize("tied", [False, True])
def test_safetensors_headers_give_the_weights_the_reader_makes(tmp_path, tied):
    write_folder(tmp_path, llama_tensors(torch.float16, tied=tied),
                 config={**HF_CONFIG, "tie_word_embeddings": tied})
    config, shapes = split.checkpoint_shapes(str(tmp_path), quantize=None)
    assert_shapes_describe(shapes, read_hf_folder(str(tmp_path)).weights)
    assert ("lm_head.weight" in shapes) is not tied


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_headers_give_the_weights_the_reader_makes(tmp_path, act_order):
    rng = np.random.default_rng(0)
    config = ModelConfig.from_hf(GPTQ_CONFIG, "config.json")
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in _expected_shapes(config).items()}
    write_gptq_folder(tmp_path, weights, group_size=128, sym=False, act_order=act_order)
    _, shapes = split.checkpoint_shapes(str(tmp_path), quantize=None)
    assert_shapes_describe(shapes, read_hf_folder(str(tmp_path)).weights)


def test_quantize_plans_what_the_loader_makes(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16))
    _, shapes = split.checkpoint_shapes(str(tmp_path), quantize=4)
    placed = {name: engine.loader._place(name, w, torch.device("cpu"), torch.float32, 4)
              for name, w in read_hf_folder(str(tmp_path)).weights.items()}
    assert_shapes_describe(shapes, placed)
    assert shapes["lm_head.weight"].group_size == 0


# ---- memory accounting --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KV_CACHE_KINDS)
def test_cache_bytes_are_what_the_kv_cache_allocates(kind):
    config = synthetic_config("llama3-8b")
    footprint = Footprint.of(config, weight_shapes(config), 1024, kv_cache=kind)
    cache = KVCache(config.num_kv_heads, config.head_dim, 1024, torch.float16, "cpu", kind=kind)
    assert footprint.layer_cache == cache.nbytes


def test_a_quantized_cache_plans_the_prompts_read_back_copy():
    """The prompt's attention reads a layer's quantized cache back in the model's dtype, a temporary."""
    config = synthetic_config("llama3-8b")
    full = Footprint.of(config, weight_shapes(config), 4096)
    q4 = Footprint.of(config, weight_shapes(config), 4096, kv_cache="q4")
    assert q4.last_buffers - full.last_buffers == 2 * config.num_kv_heads * config.head_dim * 4096 * 2
    assert q4.layer_cache < full.layer_cache / 3


def test_buffers_follow_the_documented_formula():
    config = synthetic_config("llama2-70b")
    footprint = Footprint.of(config, weight_shapes(config), 4096)
    gate_up = 2 * 28672 * 8192  # the largest 4-bit stack
    dequantized = 4096 * 28672  # the cuBLAS path's fp16 copy of 4096 outputs of down_proj, the widest input
    prefill = 6 * 2048 * 4096 + 3 * 2048 * 28672 * 2 + 8 * 2048 * 8192 * 2 + 2 * dequantized
    fixed = 2 * 6 * 4096 + split.GRAPH_POOL_SLACK + 2 * 4096 * 128 * 2
    load = 9 * 4096 * 28672 + gate_up  # repacked 4096 outputs at a time
    assert footprint.buffers == max(prefill, load) + fixed
    assert footprint.last_buffers == max(prefill + 10 * 2048 * 32000, load) + fixed


def test_a_stack_smaller_than_a_dequantized_part_is_planned_whole():
    config = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=64)
    footprint = Footprint.of(config, weight_shapes(config), 1024)
    gate_up = 2 * 512 * 256  # the largest 4-bit stack, under 4096 outputs of the widest input
    prefill = 6 * 1024 * 1024 + 3 * 1024 * 512 * 2 + 8 * 1024 * 256 * 2 + 2 * gate_up
    assert footprint.buffers == prefill + 2 * 6 * 1024 + split.GRAPH_POOL_SLACK + 2 * 1024 * 64 * 2


@pytest.mark.parametrize("tied", [False, True])
def test_only_a_tied_embedding_table_is_planned_on_the_gpu(tied):
    """An untied table stays in CPU memory; a tied one is the head too. On one GPU the table's size counts once
    either way: as the embedding when tied, as the head when not."""
    config = synthetic_config("llama2-7b")
    shapes = weight_shapes(config)
    if tied:
        del shapes["lm_head.weight"]
    footprint = Footprint.of(config, shapes, 4096)
    table = 32000 * 4096 * 2
    assert footprint.embedding == (table if tied else 0)
    assert footprint.head == table
    alone = footprint.share(0, range(0, 32), True, True)
    assert alone.weights == sum(footprint.layers) + footprint.norm + table
    first = footprint.share(0, range(0, 16), True, False)
    assert first.weights == sum(footprint.layers[:16]) + (table if tied else 0)


def test_the_table_stays_in_cpu_memory_only_for_an_untied_model_on_a_gpu():
    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert embedding_device(gpu, tied=False) == cpu
    assert embedding_device(gpu, tied=True) == gpu
    assert embedding_device(cpu, tied=False) == cpu
    assert embedding_device(cpu, tied=True) == cpu


def test_long_contexts_cost_cache_and_attention_buffers():
    config = synthetic_config("llama2-7b")
    short, long = (Footprint.of(config, weight_shapes(config), n) for n in (2048, 8192))
    assert long.layer_cache == 4 * short.layer_cache
    assert long.buffers > short.buffers
    assert long.layers == short.layers


def test_a_context_shorter_than_a_prefill_chunk_plans_for_its_own_length():
    config = synthetic_config("llama2-7b")
    short, chunk = (Footprint.of(config, weight_shapes(config), n) for n in (64, 2048))
    assert short.buffers < chunk.buffers


def test_a_share_adds_its_parts_with_the_margin():
    config = synthetic_config("llama2-7b")
    footprint = Footprint.of(config, weight_shapes(config), 4096)
    share = footprint.share(0, range(0, 32), True, True)
    assert share.weights == sum(footprint.layers) + footprint.embedding + footprint.norm + footprint.head
    assert share.cache == 32 * footprint.layer_cache
    base = share.weights + share.cache + footprint.last_buffers
    assert share.buffers == footprint.last_buffers + -(-base * 4 // 100) + split.RESERVE
    assert share.total == share.weights + share.cache + share.buffers


# ---- the split rules (margin and reserve off, so the arithmetic is exact) ---------------------------


@pytest.fixture
def exact(monkeypatch):
    monkeypatch.setattr(split, "MARGIN", 0)
    monkeypatch.setattr(split, "RESERVE", 0)


def toy(tied=False, layers=8):
    """Layers of 10 bytes with 2 of cache each; embedding 5, norm 1, head 5; buffers 3, or 4 with the head."""
    return Footprint(layers=(10,) * layers, layer_cache=2, embedding=5, norm=1, head=5, tied=tied,
                     buffers=3, last_buffers=4, max_seq_len=16)


def test_gpus_are_filled_in_order(exact):
    placement = plan_split(toy(), [50, 100])
    assert [(s.device, s.layers) for s in placement.shares] == [(0, range(0, 3)), (1, range(3, 8))]
    assert [s.total for s in placement.shares] == [5 + 3 * 12 + 3, 5 * 12 + 1 + 5 + 4]


def test_weights_go_where_their_layers_are(exact):
    placement = plan_split(toy(), [50, 100])
    assert placement.device_of("model.embed_tokens.weight") == torch.device("cuda", 0)
    assert placement.device_of("model.layers.2.mlp.up_proj.weight") == torch.device("cuda", 0)
    assert placement.device_of("model.layers.3.input_layernorm.weight") == torch.device("cuda", 1)
    assert placement.device_of("model.norm.weight") == torch.device("cuda", 1)
    assert placement.device_of("lm_head.weight") == torch.device("cuda", 1)
    assert placement.first_device == torch.device("cuda", 0)


def test_a_model_that_fits_on_the_first_gpu_stays_there(exact):
    placement = plan_split(toy(), [1000, 1000])
    assert [(s.device, s.layers) for s in placement.shares] == [(0, range(0, 8))]


def test_when_the_head_does_not_fit_beside_the_last_layer_that_layer_moves_on(exact):
    # 8 layers and the embedding fill 104 exactly; the head would need 7 more.
    placement = plan_split(toy(), [5 + 8 * 12 + 3, 100])
    assert [(s.device, s.layers) for s in placement.shares] == [(0, range(0, 7)), (1, range(7, 8))]


def test_a_gpu_too_small_for_one_layer_is_skipped_and_the_embedding_moves_on(exact):
    placement = plan_split(toy(), [10, 200])
    assert [(s.device, s.layers) for s in placement.shares] == [(1, range(0, 8))]
    assert placement.first_device == torch.device("cuda", 1)
    assert placement.shares[0].weights == 8 * 10 + 5 + 1 + 5


def test_tied_embeddings_need_a_head_copy_only_on_another_gpu(exact):
    alone = plan_split(toy(tied=True), [1000])
    assert alone.shares[0].weights == 8 * 10 + 5 + 1
    split_over_two = plan_split(toy(tied=True), [50, 1000])
    assert split_over_two.shares[-1].weights == 5 * 10 + 1 + 5


@pytest.mark.parametrize("budgets", [[30, 30, 30, 50], [45, 45, 45], [21, 200], [120, 8, 30], [40, 40, 40, 40, 40]])
def test_every_plan_is_in_order_within_budget_and_greedy(exact, budgets):
    footprint = toy()
    shares = plan_split(footprint, budgets).shares
    assert [i for s in shares for i in s.layers] == list(range(8))
    for share in shares:
        assert share.total <= budgets[share.device]
        if share is not shares[-1]:  # the next layer did not fit here (with the head, if it is the last)
            more = range(share.layers.start, share.layers.stop + 1)
            bigger = footprint.share(share.device, more, share is shares[0], more.stop == 8)
            assert bigger.total > budgets[share.device]


def test_a_real_70b_split_fits_its_budgets():
    config = synthetic_config("llama2-70b")
    footprint = Footprint.of(config, weight_shapes(config), 4096)
    placement = plan_split(footprint, gpu_budgets("20,80", gpus(80, 80)))
    first, second = placement.shares
    assert first.layers.start == 0 and second.layers.stop == 80 and first.layers.stop == second.layers.start
    assert first.total <= 20 * GiB and second.total <= 80 * GiB
    assert re.fullmatch(r"cuda:0 layers 0-\d+: [\d.]+ GiB \([\d.]+ weights \+ [\d.]+ cache \+ [\d.]+ buffers\); "
                        r"cuda:1 layers \d+-79: .*", placement.describe())


# ---- refusals, before anything is loaded ---------------------------------------------------------------


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(ModelError) as error:
        call(*args, **kwargs)
    return str(error.value)


def test_a_model_too_large_for_the_budgets_says_what_it_needs():
    config = synthetic_config("llama2-70b")
    footprint = Footprint.of(config, weight_shapes(config), 4096)
    message = error_of(plan_split, footprint, gpu_budgets("17,17", gpus(80, 80)))
    found = re.fullmatch(r"the model does not fit: it needs ([\d.]+) GiB \(([\d.]+) weights \+ ([\d.]+) KV cache "
                         r"for 4096 tokens \+ ([\d.]+) buffers\) and the GPUs offer 2 x 17.0 GiB, room for "
                         r"(\d+) of its 80 layers; lower --max-seq-len or give it more GPU memory", message)
    assert found, message
    needs, weights, cache, buffers = (float(found.group(i)) for i in range(1, 5))
    assert abs(weights + cache + buffers - needs) <= 0.15
    assert 34 < weights < 36 and 1.2 <= cache <= 1.3
    assert 0 < int(found.group(5)) < 80


def test_auto_uses_free_memory_and_names_it_when_short():
    config = synthetic_config("llama2-7b")
    footprint = Footprint.of(config, weight_shapes(config), 4096)
    assert plan_split(footprint, gpu_budgets("auto", gpus(40, 40))).shares[0].layers == range(0, 32)
    message = error_of(plan_split, footprint, gpu_budgets("auto", gpus(2.5, 3.0)))
    assert "the GPUs offer 2.5 + 3.0 GiB" in message


@pytest.mark.parametrize("spec", ["abc", "", "17,", "17,-1", "nan", "24;24"])
def test_a_malformed_split_is_refused(spec):
    assert error_of(split.parse_gpu_split, spec) == f"--gpu-split {spec!r} is not GiB per GPU like 17.2,24, nor auto"


def test_split_parsing():
    assert split.parse_gpu_split("17.2,24") == [17.2, 24.0]
    assert split.parse_gpu_split(" AUTO ") is None


def test_more_shares_than_gpus_is_refused():
    assert error_of(gpu_budgets, "10,10,10", gpus(80, 80)) == "--gpu-split gives 3 shares but only 2 GPUs are visible"


def test_shares_are_capped_at_free_memory_and_only_the_gpus_named_are_asked():
    asked = []

    def free_memory(count):
        asked.append(count)
        return [int(80 * GiB), int(2 * GiB)][:count]

    assert gpu_budgets("24", free_memory) == [24 * GiB]
    assert gpu_budgets("4,40", free_memory) == [4 * GiB, 2 * GiB]
    assert asked == [1, 2]
    config = synthetic_config("llama2-7b")
    footprint = Footprint.of(config, weight_shapes(config), 4096)
    assert "the GPUs offer 4.0 + 2.0 GiB" in error_of(plan_split, footprint, gpu_budgets("4,40", free_memory))


def test_no_gpu_no_split():
    assert error_of(gpu_budgets, "auto", gpus()) == "--gpu-split needs CUDA GPUs, and none is visible"


@pytest.fixture
def nothing_read(monkeypatch):
    """Fail the test if the loader reads the checkpoint's tensors."""
    def refuse(path):
        raise AssertionError("the checkpoint was read before the plan refused it")

    monkeypatch.setattr(engine.loader, "read_checkpoint", refuse)


def fake_gpus(monkeypatch, *free_gib):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free_gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (int(free_gib[index] * GiB), 80 * GiB))


def test_load_model_refuses_a_model_that_does_not_fit_before_reading_it(monkeypatch, nothing_read):
    fake_gpus(monkeypatch, 0.5, 0.5)
    message = error_of(engine.loader.load_model, "default", gpu_split="auto", max_seq_len=8192)
    assert message.startswith("the model does not fit: it needs ")
    assert "KV cache for 8192 tokens" in message and "the GPUs offer 2 x 0.5 GiB" in message


def test_load_model_without_gpus(nothing_read):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert error_of(engine.loader.load_model, "default", gpu_split="auto") == \
        "--gpu-split needs CUDA GPUs, and none is visible"


def test_cli_reports_a_bad_split_in_one_line(capsys):
    assert main(["generate", "--prompt", "hi", "--gpu-split", "24GB"]) == 2
    assert capsys.readouterr().err == "error: --gpu-split '24GB' is not GiB per GPU like 17.2,24, nor auto\n"


# ---- the forward pass in segments ----------------------------------------------------------------------


def test_a_model_run_in_two_segments_gives_the_logits_of_one():
    # On the CPU both segments share a device, but the hand-over from one to the next is the same code.
    config = ModelConfig.from_hf(HF_CONFIG, "config.json")
    model = Transformer(config, {name: w.float() for name, w in llama_tensors(torch.float16).items()})
    model.setup_cache(32, torch.float32)
    tokens = torch.tensor([[5, 17, 42, 7, 99]])
    whole = model(tokens)
    assert len(model.segments) == 1
    model.segments = [Segment(torch.device("cpu"), range(0, 1)), Segment(torch.device("cpu"), range(1, 2))]
    assert torch.equal(model(tokens), whole)
    # As the CUDA graphs run them: the embedded tokens into the first segment, its hidden states into the next.
    positions = torch.arange(5)
    hidden = model.run_segment(0, model.embed(tokens), positions, 5, causal=True)
    assert torch.equal(model.run_segment(1, hidden, positions, 5, causal=True), whole)
