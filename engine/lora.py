"""PEFT LoRA adapters, applied unmerged so that every request can choose its own mix without reloading.

Each adapted linear layer keeps the low-rank factors of all loaded adapters side by side:

    lora_a        [sum of ranks, in]    every adapter's A, one after another
    lora_b        [out, sum of ranks]   every adapter's B, in the same order
    coefficients  [sum of ranks]        scale * request weight on an adapter's ranks, 0 for adapters left out

and adds ((x @ lora_a^T) * coefficients) @ lora_b^T to the base layer's output. Choosing a request's mix
only overwrites `coefficients` in place, so no tensor changes shape or address and a captured CUDA graph
stays valid. Only loading an adapter reallocates.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import ModelError

ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT names a weight after the module path inside the wrapped HF model; ours lacks the leading "model.".
WEIGHT_KEY = re.compile(r"base_model\.model\.model\."
                        r"(layers\.(\d+)\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))\.lora_([AB])\.weight")

# adapter_config.json settings that change the forward pass beyond plain LoRA: refused when set.
UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "adapted parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}


class LoraLinear(nn.Module):
    """A linear layer plus the low-rank updates of every loaded adapter that targets it."""

    def __init__(self, base: nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_a", torch.empty(0, self.in_features, device=device, dtype=dtype), persistent=False)
        self.register_buffer("lora_b", torch.empty(self.out_features, 0, device=device, dtype=dtype), persistent=False)
        self.register_buffer("coefficients", torch.empty(0, device=device, dtype=dtype), persistent=False)
        self.spans: dict[str, tuple[int, int, float]] = {}  # adapter name -> (first rank, end rank, scale)
        self.active = False  # any coefficient non-zero: otherwise the update is skipped

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Append one adapter's factors; every coefficient is reset to 0 until the next set_mix."""
        start = self.lora_a.shape[0]
        self.lora_a = torch.cat((self.lora_a, a.to(self.lora_a)))
        self.lora_b = torch.cat((self.lora_b, b.to(self.lora_b)), dim=1)
        self.coefficients = self.lora_a.new_zeros(self.lora_a.shape[0])
        self.spans[name] = (start, self.lora_a.shape[0], scale)
        self.active = False

    def set_mix(self, mix: dict[str, float]) -> None:
        coefficients = torch.zeros(self.coefficients.shape, dtype=torch.float32)
        for name, weight in mix.items():
            if name in self.spans:
                start, end, scale = self.spans[name]
                coefficients[start:end] = scale * weight
        self.coefficients.copy_(coefficients)  # in place: a captured graph keeps reading this very tensor
        self.active = bool(coefficients.any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # Eager calls skip the update while no adapter is active. A CUDA graph must always record it, or a
        # mix chosen after the capture would be ignored by every replay.
        if not (self.active or self.lora_a.is_cuda and torch.cuda.is_current_stream_capturing()):
            return out
        # x is the layer's real input, before any act-order permutation inside a Q4Linear, as PEFT sees it.
        return out + F.linear(F.linear(x, self.lora_a) * self.coefficients, self.lora_b)


@dataclass
class LowRankUpdate:
    module: str  # path of the linear layer inside our Transformer, e.g. "layers.3.self_attn.q_proj"
    block: int  # index of the block holding it
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    scale: float


class LoraSet:
    """The adapters loaded into one model, and the mix of them its forward pass applies now."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self.folders: dict[str, str] = {}  # adapter name -> the folder it was loaded from
        self.mix: dict[str, float] = {}  # adapter name -> weight, for the adapters applied now

    def load(self, name: str, folder: str) -> None:
        """Read a PEFT LoRA adapter folder and add it under `name`; the mix applied now stays in force."""
        if not name:
            raise ModelError(f"{folder}: the adapter needs a non-empty name")
        if name in self.folders:
            raise ModelError(f"an adapter named {name!r} is already loaded; give each adapter its own name (NAME=DIR)")
        self.add(name, read_adapter(folder, self.model), folder)  # every check passes before the model changes

    def add(self, name: str, updates: list[LowRankUpdate], source: str) -> None:
        """Add already checked updates under `name`; `source` says where they came from."""
        for update in updates:
            self._lora_layer(update).add(name, update.a, update.b, update.scale)
        self.folders[name] = source
        self._write(self.mix)  # adding reset the coefficients of the layers it touched

    def activate(self, adapters: dict[str, float] | None) -> dict[str, float]:
        """Apply these adapters at these weights from the next forward pass on.

        Returns the mix as applied, without zero weights: equal mixes give equal keys and values.
        """
        adapters = adapters or {}
        for name, weight in adapters.items():
            if name not in self.folders:
                loaded = ", ".join(self.folders) or "none"
                raise ModelError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
            if not math.isfinite(weight):
                raise ModelError(f"adapter {name!r} has weight {weight}; use a finite number")
        mix = {name: float(weight) for name, weight in adapters.items() if weight != 0}
        if mix != self.mix:
            self._write(mix)
        return mix

    def _write(self, mix: dict[str, float]) -> None:
        for module in self.model.modules():
            if isinstance(module, LoraLinear):
                module.set_mix(mix)
        self.mix = mix

    def _lora_layer(self, update: LowRankUpdate) -> LoraLinear:
        """The LoraLinear the update belongs to, wrapping the plain linear layer there on first use."""
        parent_path, _, attribute = update.module.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        layer = getattr(parent, attribute)
        if not isinstance(layer, LoraLinear):
            # The block's norm tells its device: a 4-bit layer handed to the CUDA kernels keeps no tensors.
            device = self.model.layers[update.block].input_layernorm.weight.device
            layer = LoraLinear(layer, device, self.dtype)
            setattr(parent, attribute, layer)
        return layer


def read_adapter(folder: str, model: nn.Module) -> list[LowRankUpdate]:
    """The updates in a PEFT adapter folder, checked against the model's layers."""
    if not os.path.isdir(folder):
        raise ModelError(f"{folder}: no such adapter folder")
    config_path = os.path.join(folder, "adapter_config.json")
    settings = read_settings(config_path)
    weights_path, tensors = read_tensors(folder)
    pairs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # (module path, block index) -> "A"/"B" -> factor
    for key, tensor in tensors.items():
        match = WEIGHT_KEY.fullmatch(key)
        if match is None:
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            raise ModelError(f"{weights_path}: the adapter changes {module!r}; only the {', '.join(ADAPTABLE)} "
                             f"layers can be adapted")
        path, layer, factor = match.groups()
        if int(layer) >= len(model.layers):
            raise ModelError(f"{weights_path}: {key} is for layer {layer}, but the model has {len(model.layers)} "
                             f"layers; was the adapter trained for another model?")
        pairs.setdefault((path, int(layer)), {})[factor] = tensor
    if not pairs:
        raise ModelError(f"{weights_path}: the file holds no LoRA weights")
    return [_update(path, layer, pair, settings, model.get_submodule(path), weights_path)
            for (path, layer), pair in sorted(pairs.items())]


def read_settings(config_path: str) -> dict:
    """adapter_config.json, with every setting we cannot apply refused."""
    try:
        with open(config_path, encoding="utf-8") as f:
            settings = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{config_path}: not found; a PEFT adapter folder holds adapter_config.json and "
                         f"adapter_model.safetensors") from None
    except (OSError, ValueError) as error:
        raise ModelError(f"{config_path}: cannot read the adapter settings ({error})") from None
    if not isinstance(settings, dict):
        raise ModelError(f"{config_path}: not PEFT adapter settings (expected a JSON object)")
    kind = settings.get("peft_type", "LORA")
    if kind != "LORA":
        raise ModelError(f"{config_path}: {kind} adapters are not supported; only LoRA adapters are")
    for key, description in UNSUPPORTED_SETTINGS.items():
        if settings.get(key):
            raise ModelError(f"{config_path}: {description} is not supported; only plain LoRA adapters are")
    if settings.get("init_lora_weights") == "mica":
        raise ModelError(f"{config_path}: MiCA (init_lora_weights \"mica\") is not supported; "
                         f"only plain LoRA adapters are")
    if settings.get("bias", "none") != "none":
        raise ModelError(f"{config_path}: trained biases (bias {settings['bias']!r}) are not supported; "
                         f"only adapters with bias \"none\" are")
    targets = settings.get("target_modules")
    if isinstance(targets, list):  # a string is a regular expression: the weight names say what it matched
        for target in targets:
            if target.rsplit(".", 1)[-1] not in ADAPTABLE:
                raise ModelError(f"{config_path}: target module {target!r} is not supported; only the "
                                 f"{', '.join(ADAPTABLE)} layers can be adapted")
    return settings


def read_tensors(folder: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The adapter's weights from adapter_model.safetensors, or else adapter_model.bin, and that file's path."""
    path = os.path.join(folder, "adapter_model.safetensors")
    if os.path.exists(path):
        try:
            return path, load_file(path)
        except (OSError, SafetensorError) as error:
            raise ModelError(f"{path}: cannot read the adapter weights ({error})") from None
    path = os.path.join(folder, "adapter_model.bin")
    if os.path.exists(path):
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise ModelError(f"{path}: cannot read the adapter weights ({error})") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ModelError(f"{path}: not a PEFT adapter file (expected a dictionary of tensors)")
        return path, tensors
    raise ModelError(f"{folder}: no adapter_model.safetensors or adapter_model.bin found")


def _update(path: str, block: int, pair: dict[str, torch.Tensor], settings: dict, layer: nn.Module,
            weights_path: str) -> LowRankUpdate:
    """One layer's factors with PEFT's scale, checked to fit the layer and the configured rank."""
    for factor, other in (("A", "B"), ("B", "A")):
        if factor not in pair:
            raise ModelError(f"{weights_path}: {path} has lora_{other} but no lora_{factor}")
    peft_key = "model." + path  # the module name PEFT matches rank_pattern and alpha_pattern against
    # Missing r and lora_alpha mean PEFT's defaults, 8 and 8.
    rank = int(_pattern_value(settings.get("rank_pattern") or {}, peft_key, settings.get("r", 8)))
    alpha = float(_pattern_value(settings.get("alpha_pattern") or {}, peft_key, settings.get("lora_alpha", 8)))
    expected = {"A": (rank, layer.in_features), "B": (layer.out_features, rank)}
    for factor, shape in expected.items():
        if tuple(pair[factor].shape) != shape:
            raise ModelError(f"{weights_path}: {path}.lora_{factor} has shape {list(pair[factor].shape)} where this "
                             f"model with r={rank} needs {list(shape)}; was the adapter trained for another model?")
    scale = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    return LowRankUpdate(path, block, pair["A"].float(), pair["B"].float(), scale)


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's rule: the first pattern that matches the end of the module's name, from a dot on."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default
