"""The HF safetensors folder reader: dense dtypes, sharding, tokenizer settings and every load error."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ModelError
from engine.formats.hf import read_hf_folder

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}


def llama_tensors(dtype, tied=False):
    """Random weights with the shapes CONFIG implies (head_dim 16: q 64 rows, k and v 32 rows)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(100, 64), "model.norm.weight": rand(64)}
    if not tied:
        tensors["lm_head.weight"] = rand(100, 64)
    for n in range(2):
        layer = f"model.layers.{n}"
        tensors |= {
            f"{layer}.input_layernorm.weight": rand(64),
            f"{layer}.post_attention_layernorm.weight": rand(64),
            f"{layer}.self_attn.q_proj.weight": rand(64, 64),
            f"{layer}.self_attn.k_proj.weight": rand(32, 64),
            f"{layer}.self_attn.v_proj.weight": rand(32, 64),
            f"{layer}.self_attn.o_proj.weight": rand(64, 64),
            f"{layer}.mlp.gate_proj.weight": rand(96, 64),
            f"{layer}.mlp.up_proj.weight": rand(96, 64),
            f"{layer}.mlp.down_proj.weight": rand(64, 96),
        }
    return tensors


def write_folder(folder, tensors, config=CONFIG, shards=1):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({name: tensors[name] for name in part}, os.path.join(folder, shard))
        weight_map |= {name: shard for name in part}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def load_error(folder) -> str:
    with pytest.raises(ModelError) as err:
        read_hf_folder(str(folder))
    return str(err.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shards", [1, 3])
def test_dense_weights_load_exactly_in_their_dtype(tmp_path, dtype, shards):
    tensors = llama_tensors(dtype)
    write_folder(tmp_path, tensors, shards=shards)
    checkpoint = read_hf_folder(str(tmp_path))
    assert checkpoint.weights.keys() == tensors.keys()
    for name, expected in tensors.items():
        assert checkpoint.weights[name].dtype == dtype, name
        assert torch.equal(checkpoint.weights[name], expected), name
    config = checkpoint.config
    shape = (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim)
    assert shape == (64, 2, 4, 2, 16)
    assert config.eos_token_ids == [2]
    assert checkpoint.tokenizer_source == str(tmp_path)
    assert checkpoint.tokenizer_settings == {}


def test_tied_embeddings_leave_out_lm_head_and_extra_tensors_are_ignored(tmp_path):
    tensors = llama_tensors(torch.float16, tied=True)
    # Tools often save a copy of the tied head and old rotary buffers; neither belongs in the weights.
    extra = {"lm_head.weight": tensors["model.embed_tokens.weight"].clone(),
             "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    write_folder(tmp_path, tensors | extra, config=CONFIG | {"tie_word_embeddings": True})
    assert read_hf_folder(str(tmp_path)).weights.keys() == tensors.keys()


def test_zero_bias_is_dropped_and_nonzero_bias_is_refused(tmp_path):
    tensors = llama_tensors(torch.float16)
    write_folder(tmp_path, tensors | {"model.layers.1.mlp.up_proj.bias": torch.zeros(96, dtype=torch.float16)})
    assert "model.layers.1.mlp.up_proj.bias" not in read_hf_folder(str(tmp_path)).weights

    write_folder(tmp_path, tensors | {"model.layers.1.mlp.up_proj.bias": torch.ones(96, dtype=torch.float16)})
    assert load_error(tmp_path) == (
        f"{tmp_path}/model.safetensors: tensor model.layers.1.mlp.up_proj.bias is nonzero, but Llama layers "
        f"have no bias; this model is not a plain Llama and is not supported"
    )


def test_tokenizer_settings_come_from_tokenizer_config_and_chat_template_file(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    settings = read_hf_folder(str(tmp_path)).tokenizer_settings
    assert settings == {"bos_token": "<s>", "add_bos_token": True, "chat_template": "{{ messages }}"}

    # A template inside tokenizer_config.json wins over the separate file.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "inline"}))
    assert read_hf_folder(str(tmp_path)).tokenizer_settings == {"chat_template": "inline"}


def test_missing_folder(tmp_path):
    assert load_error(tmp_path / "nope") == f"{tmp_path}/nope: no such folder"


def test_folder_without_config(tmp_path):
    save_file(llama_tensors(torch.float16), str(tmp_path / "model.safetensors"))
    assert load_error(tmp_path) == f"{tmp_path}: config.json is missing; point at a Hugging Face model folder"


def test_config_that_is_not_json(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16))
    (tmp_path / "config.json").write_text("{'hidden_size': 64}")
    message = load_error(tmp_path)
    assert message.startswith(f"{tmp_path}/config.json: not valid JSON (")
    assert message.endswith("); fix or download the file again")


def test_unsupported_architecture(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16),
                 config=CONFIG | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    assert load_error(tmp_path).startswith(
        f"{tmp_path}/config.json: architecture 'GPT2LMHeadModel' is not supported"
    )


def test_folder_without_safetensors(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16))
    os.rename(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    assert load_error(tmp_path) == f"{tmp_path}: no .safetensors files; this engine reads safetensors, not .bin or .pt"


def test_missing_shard(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16), shards=2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    assert load_error(tmp_path) == (
        f"{tmp_path}/model.safetensors.index.json: shard model-00002-of-00002.safetensors "
        f"is missing from the folder; download it"
    )


def test_truncated_data(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16))
    path = tmp_path / "model.safetensors"
    size = path.stat().st_size - 100
    os.truncate(path, size)
    message = load_error(tmp_path)
    assert message.startswith(f"{path}: data of tensor ")
    assert message.endswith(f", beyond the file size ({size} bytes); the file is truncated, download it again")


def test_truncated_header(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16))
    path = tmp_path / "model.safetensors"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    os.truncate(path, 50)
    assert load_error(tmp_path) == (
        f"{path}: header length {header_len} runs past the end of the file (50 bytes); "
        f"the file is truncated or not safetensors"
    )


def test_file_shorter_than_the_header_length_field(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16))
    path = tmp_path / "model.safetensors"
    os.truncate(path, 3)
    assert load_error(tmp_path) == f"{path}: file is 3 bytes, too short to be safetensors; download it again"


def test_corrupt_header(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16))
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("#")  # the header's opening brace
    path.write_bytes(bytes(data))
    assert load_error(tmp_path) == f"{path}: header is not valid JSON; the file is corrupt or not safetensors"


def test_data_offsets_that_disagree_with_shape(tmp_path):
    write_folder(tmp_path, {"model.norm.weight": torch.ones(64, dtype=torch.float16)})
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    # Same-length edit of the header: the tensor now claims 65 elements for 128 bytes.
    path.write_bytes(data.replace(b"[64]", b"[65]", 1))
    assert load_error(tmp_path) == (
        f"{path}: tensor model.norm.weight has data offsets [0, 128] that do not match its shape [65] "
        f"and dtype F16; the file is corrupt"
    )


def test_missing_tensor(tmp_path):
    tensors = llama_tensors(torch.float16)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    write_folder(tmp_path, tensors)
    assert load_error(tmp_path) == (
        f"{tmp_path}/model.safetensors: tensor model.layers.1.mlp.down_proj.weight is missing; "
        f"the checkpoint is incomplete or not a Llama model"
    )


def test_missing_tensor_in_sharded_folder_names_the_index(tmp_path):
    tensors = llama_tensors(torch.float16)
    del tensors["model.norm.weight"]
    write_folder(tmp_path, tensors, shards=2)
    assert load_error(tmp_path).startswith(
        f"{tmp_path}/model.safetensors.index.json: tensor model.norm.weight is missing"
    )


def test_wrong_shape_for_config(tmp_path):
    write_folder(tmp_path, llama_tensors(torch.float16), config=CONFIG | {"intermediate_size": 128})
    assert load_error(tmp_path) == (
        f"{tmp_path}/model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape [96, 64] "
        f"but config.json implies [128, 64]; the weights do not belong to this config"
    )


def test_weights_of_an_unsupported_dtype(tmp_path):
    tensors = llama_tensors(torch.float16)
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    write_folder(tmp_path, tensors)
    assert load_error(tmp_path) == (
        f"{tmp_path}/model.safetensors: tensor model.norm.weight is torch.int8; "
        f"expected float16, bfloat16 or float32"
    )


def test_tensor_in_two_files(tmp_path):
    tensors = llama_tensors(torch.float16)
    write_folder(tmp_path, tensors)
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, str(tmp_path / "extra.safetensors"))
    assert load_error(tmp_path) == (
        f"{tmp_path}/model.safetensors: tensor model.norm.weight is also in {tmp_path}/extra.safetensors; "
        f"remove the extra file"
    )
