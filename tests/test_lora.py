"""LoRA adapters made with peft on the default model: our unmerged, per-request mixes against peft's own forward."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.__main__ import adapter_mix, build_parser
from engine.errors import ModelError
from engine.generator import Generator
from engine.lora import LoraStack
from engine.sampling import SamplingSettings
from references import hf_model, our_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> peft LoraConfig arguments
    "attn4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=PROJECTIONS),
    "mlp8": dict(r=8, lora_alpha=16, target_modules=r".*\.mlp\.(gate|up|down)_proj",
                 rank_pattern={"down_proj": 4}, alpha_pattern={"up_proj": 24}),  # saved as adapter_model.bin
}
MIX = {"attn4": 0.5, "all16": 1.0}
PROMPT = "<|im_start|>user\nWhat are the three primary colours?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """peft over a copy of the HF reference model, holding every adapter plus MIX as peft's "cat" combination,
    and the folder each adapter was saved to."""
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for name, settings in ADAPTERS.items():
        config = LoraConfig(**settings)
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(hf_model()), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    # peft starts B at zero, which would make every adapter a no-op: give all factors random values instead.
    generator = torch.Generator().manual_seed(0)
    for key, parameter in peft_model.named_parameters():
        if ".lora_A." in key or ".lora_B." in key:
            std = 0.8 / parameter.shape[1] ** 0.5
            parameter.data = torch.randn(parameter.shape, generator=generator) * std
    root = tmp_path_factory.mktemp("adapters")
    peft_model.save_pretrained(root, selected_adapters=["attn4", "all16"])
    peft_model.save_pretrained(root, selected_adapters=["mlp8"], safe_serialization=False)
    assert (root / "mlp8" / "adapter_model.bin").exists()
    peft_model.add_weighted_adapter(list(MIX), list(MIX.values()), "mix", combination_type="cat")
    return peft_model.eval(), {name: str(root / name) for name in ADAPTERS}


@pytest.fixture(scope="module")
def loaded(reference):
    """A copy of the shared engine model with every adapter loaded; the shared one stays as other tests expect."""
    shared = our_model()
    loaded = dataclasses.replace(shared, model=copy.deepcopy(shared.model))
    for name, folder in reference[1].items():
        loaded.adapters.load(name, folder)
    return loaded


def prompt_ids():
    return our_model().tokenizer.encode_chat(PROMPT)


@pytest.fixture(scope="module")
def base_logits(reference):
    with torch.inference_mode(), reference[0].disable_adapter():
        return reference[0](torch.tensor([prompt_ids()])).logits[0]


@pytest.mark.parametrize("mix, peft_adapter", [
    ({}, None), ({"attn4": 1.0}, "attn4"), ({"all16": 1.0}, "all16"), ({"mlp8": 1.0}, "mlp8"), (MIX, "mix"),
], ids=["none", "attn4", "all16_rslora", "mlp8_bin_patterns", "weighted_mix"])
def test_logits_at_every_position_match_peft(mix, peft_adapter, reference, base_logits, loaded):
    peft_model, _ = reference
    tokens = torch.tensor([prompt_ids()])
    with torch.inference_mode():
        if peft_adapter is None:
            expected = base_logits
        else:
            peft_model.set_adapter(peft_adapter)
            expected = peft_model(tokens).logits[0]
        loaded.adapters.activate(mix)
        ours = loaded.model(tokens, 0, last_only=False)[0]
    tolerance = 1e-3 * expected.abs().max().item()
    assert (ours - expected).abs().max().item() <= tolerance
    if peft_adapter is not None:  # the adapter must matter, or matching says nothing
        assert (expected - base_logits).abs().max().item() > 100 * tolerance


def greedy(generator, mix):
    stream = generator.generate(prompt_ids(), SamplingSettings(temperature=0), max_new_tokens=8,
                                stop_on_eos=False, adapters=mix)
    "".join(stream)
    return stream.result


def test_switching_adapters_between_requests_matches_fresh_runs(loaded):
    mixes = {"attn4": {"attn4": 1.0}, "mix": MIX, "none": None}
    fresh = {label: greedy(Generator(loaded), mix).token_ids for label, mix in mixes.items()}
    assert len({tuple(tokens) for tokens in fresh.values()}) == 3
    generator = Generator(loaded)
    for label in ["attn4", "mix", "none", "attn4"]:
        result = greedy(generator, mixes[label])
        assert result.token_ids == fresh[label]
        assert result.reused_tokens == 0  # another mix filled the cache: none of it may be reused
    assert greedy(generator, {"attn4": 1.0, "all16": 0.0}).reused_tokens == len(prompt_ids()) - 1  # same mix


def test_unknown_adapter_names_are_refused(loaded):
    generator = Generator(loaded)
    with pytest.raises(ModelError, match="no adapter named 'nope' is loaded"):
        generator.choose(prompt_ids(), ["Ann:", "Bob:"], SamplingSettings(), adapters={"nope": 1.0})
    with pytest.raises(ModelError, match="no adapter named 'nope' is loaded"):
        "".join(generator.generate(prompt_ids(), SamplingSettings(), adapters={"attn4": 1.0, "nope": 0.5}))
    with pytest.raises(ModelError, match="'attn4' is already loaded"):
        loaded.adapters.load("attn4", "/nowhere")


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def edit_settings(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return edit


def edit_tensors(change):
    def edit(folder):
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return edit


def move_to_layer_30(tensors):
    for factor in "AB":
        key = f"{Q0}.lora_{factor}.weight"
        tensors[key.replace("layers.0.", "layers.30.")] = tensors.pop(key)


def add_lm_head(tensors):
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.ones(4, 576)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.ones(49152, 4)


def adapt_lm_head(folder):
    edit_settings(target_modules="q_proj|lm_head")(folder)  # a regular expression: only the weights tell
    edit_tensors(add_lm_head)(folder)


def corrupt_bin(folder):
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"not a pickle")


REFUSALS = {  # case -> (how to break a good adapter folder, what the message must say)
    "dora": (edit_settings(use_dora=True), "DoRA (use_dora) is not supported"),
    "bias": (edit_settings(bias="lora_only"), "trained biases (bias 'lora_only') are not supported"),
    "modules_to_save": (edit_settings(modules_to_save=["lm_head"]), "(modules_to_save) is not supported"),
    "fan_in_fan_out": (edit_settings(fan_in_fan_out=True), "(fan_in_fan_out) is not supported"),
    "not_lora": (edit_settings(peft_type="IA3"), "IA3 adapters are not supported"),
    "embed_tokens_target": (edit_settings(target_modules=["q_proj", "embed_tokens"]),
                            "target module 'embed_tokens' is not supported"),
    "lm_head_weights": (adapt_lm_head, "the adapter changes 'lm_head'"),
    "wrong_width": (edit_tensors(lambda tensors: tensors.update({f"{Q0}.lora_A.weight": torch.ones(4, 100)})),
                    "lora_A has shape [4, 100] where this model with r=4 needs [4, 576]"),
    "wrong_rank": (edit_settings(r=8), "lora_A has shape [4, 576] where this model with r=8 needs [8, 576]"),
    "too_many_layers": (edit_tensors(move_to_layer_30), "is for layer 30, but the model has 30 layers"),
    "lora_B_missing": (edit_tensors(lambda tensors: tensors.pop(f"{Q0}.lora_B.weight")),
                       "has lora_A but no lora_B"),
    "no_weights": (lambda folder: (folder / "adapter_model.safetensors").unlink(),
                   "no adapter_model.safetensors or adapter_model.bin found"),
    "no_settings": (lambda folder: (folder / "adapter_config.json").unlink(), "adapter_config.json: not found"),
    "corrupt_bin": (corrupt_bin, "adapter_model.bin: cannot read the adapter weights"),
    "no_folder": (shutil.rmtree, "no such adapter folder"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_unusable_adapters_are_refused_with_the_file_and_the_problem(case, tmp_path, reference, loaded):
    folder = tmp_path / "adapter"
    shutil.copytree(reference[1]["attn4"], folder)
    breaks, message = REFUSALS[case]
    breaks(folder)
    layers_before = sum(isinstance(module, LoraStack) for module in loaded.model.modules())
    with pytest.raises(ModelError) as refusal:
        loaded.adapters.load("broken", str(folder))
    assert str(folder) in str(refusal.value) and message in str(refusal.value)
    assert list(loaded.adapters.folders) == list(ADAPTERS)  # a refused adapter leaves the model as it was
    assert sum(isinstance(module, LoraStack) for module in loaded.model.modules()) == layers_before


def test_command_line_names_adapters_and_weights(tmp_path):
    folder = tmp_path / "style=v2"  # a plain folder whose name holds '=' is still a folder
    folder.mkdir()
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--lora", "chat=/models/chat-lora",
                                      "--lora", f"{folder}/", "--lora-weight", "chat=0.5"])
    assert args.lora == [("chat", "/models/chat-lora"), ("style=v2", f"{folder}/")]
    assert adapter_mix(args) == {"chat": 0.5, "style=v2": 1.0}
