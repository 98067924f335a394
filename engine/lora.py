"""PEFT LoRA adapters, applied unmerged so that every request can choose its own mix without reloading.

An adapted layer adds ((x @ A^T) * c) @ B^T to its output for each adapter, where c is the adapter's scale
times the request's weight for it (0 for adapters left out). Layers that read the same input (q, k and v;
gate and up) share one LoraInput, which stacks all their adapters' A factors, premultiplied by c:

    LoraInput.mixed   [sum of ranks, in]   every (layer, adapter) A * c, one after another
    LoraLinear.lora_b [out, layer's ranks] that layer's B factors, in the same order

so a forward pass costs one product x @ mixed^T per input, and each layer adds its columns of it times
its B, which the 4-bit CUDA kernel does in its epilogue without a launch of its own. On a one-row CUDA
step the product itself runs in the kernel that writes the input, where that is a norm (LoraNorm) or
the MLP's activation (LoraSiluMul).

Choosing a request's mix rewrites `mixed` in place, so no tensor changes shape or address and a captured
CUDA graph stays valid: the decoders keep two graphs per shape, one captured with adapters applied, which
serves every mix, and one without, so that requests with no adapter pay nothing. Only loading an adapter
reallocates.
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

from .cuda import fused
from .errors import ModelError
from .model import RMSNorm, SiluMul

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


# The layers of a block that read one input, in the order the forward pass calls them, and the module
# whose output that input is, where a fused kernel of that module can compute the product too.
SHARED_INPUTS = ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
                 (("self_attn.o_proj",), None),
                 (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
                 (("mlp.down_proj",), "mlp.act"))


class LoraInput(nn.Module):
    """The A factors of every adapted layer that reads one input, so that one product serves them all."""

    def __init__(self, in_features: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("lora_a", torch.empty(0, in_features, device=device, dtype=dtype), persistent=False)
        self.register_buffer("mixed", torch.empty_like(self.lora_a), persistent=False)
        # Row ranges of lora_a, in stacking order: (layer, adapter name, first row, end row, scale).
        self.spans: list[tuple[LoraLinear, str, int, int, float]] = []
        # Whether the request applies any adapter at all: otherwise the update is skipped. It is the same for
        # every layer, so that a CUDA graph captured with adapters applied records every layer's update, and
        # serves any later mix by the in-place rewrite of `mixed`.
        self.active = False
        self._input: torch.Tensor | None = None  # the input of the product held in _product
        self._product: torch.Tensor | None = None

    def add(self, layer: LoraLinear, name: str, a: torch.Tensor, scale: float) -> None:
        """Stack one more A factor. Rows go in the order the forward pass calls the layers, each layer's rows
        together in the order of its B columns."""
        entries = [(span[0], span[1], self.lora_a[span[2]:span[3]], span[4]) for span in self.spans]
        entries.append((layer, name, a.to(self.lora_a), scale))
        entries.sort(key=lambda entry: entry[0].call_order)  # stable: a layer's adapters keep their order
        self.lora_a = torch.cat([entry[2] for entry in entries])
        self.mixed = torch.zeros_like(self.lora_a)  # every coefficient is 0 until the next set_mix
        self.spans, row = [], 0
        for entry_layer, entry_name, factor, entry_scale in entries:
            self.spans.append((entry_layer, entry_name, row, row + factor.shape[0], entry_scale))
            row += factor.shape[0]
        for member in {span[0] for span in self.spans}:
            rows = [span for span in self.spans if span[0] is member]
            member.columns = (rows[0][2], rows[-1][3])
        self.active = False

    def set_mix(self, mix: dict[str, float]) -> None:
        coefficients = torch.zeros(self.lora_a.shape[0], dtype=torch.float32)
        for _, name, start, end, scale in self.spans:
            coefficients[start:end] = scale * mix.get(name, 0.0)
        # In place: a captured graph keeps reading this very tensor.
        self.mixed.copy_(self.lora_a.float() * coefficients.to(self.lora_a.device)[:, None])
        self.active = bool(mix)

    def hold(self, x: torch.Tensor, product: torch.Tensor) -> None:
        """Take x @ mixed^T, computed with x, for the layers about to read x."""
        self._input, self._product = x, product

    def project(self, x: torch.Tensor, layer: LoraLinear) -> torch.Tensor:
        """x @ mixed^T, computed once for the layers that read x one after another; the last of them drops it,
        so a long prompt's product is not kept."""
        if x is not self._input:
            self._input = x
            self._product = fused.low_rank_project(x, self.mixed) if one_row_on_gpu(x) else F.linear(x, self.mixed)
        product = self._product
        if layer is self.spans[-1][0]:
            self._input = self._product = None
        return product


def one_row_on_gpu(x: torch.Tensor) -> bool:
    """Whether x is a decode step's single row on the GPU, which the fused one-row kernels serve."""
    return x.numel() == x.shape[-1] and fused.serves(x)


class LoraNorm(RMSNorm):
    """The norm whose output the layers of a LoraInput read. On a one-row CUDA step one kernel normalizes and
    computes the product of the LoraInput, which then needs no launch of its own."""

    def __init__(self, norm: RMSNorm, source: LoraInput):
        super().__init__(norm.weight, norm.eps)
        self.source = [source]  # in a list, so the shared module is not registered here too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.source[0]
        if not (source.active and one_row_on_gpu(x)):
            return super().forward(x)
        y, product = fused.rms_norm_project(x, self.weight, self.eps, source.mixed)
        source.hold(y, product)
        return y


class LoraSiluMul(SiluMul):
    """The MLP's activation, whose output down_proj reads. On a one-row CUDA step one kernel writes it and the
    partial sums of the product of its LoraInput, which then needs no launch of its own."""

    def __init__(self, act: SiluMul, source: LoraInput):  # act, the plain activation replaced, holds no state
        super().__init__()
        self.source = [source]  # in a list, so the shared module is not registered here too

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        source = self.source[0]
        if not (source.active and one_row_on_gpu(gate)):
            return super().forward(gate, up)
        out, parts = fused.silu_mul_project(gate, up, source.mixed)
        source.hold(out, parts)
        return out


# The module that computes a LoraInput's product along with the input, by the type of the one it replaces.
PRODUCERS = {RMSNorm: LoraNorm, SiluMul: LoraSiluMul}


class LoraLinear(nn.Module):
    """A linear layer plus the low-rank updates of every loaded adapter that targets it."""

    def __init__(self, base: nn.Module, source: LoraInput, call_order: int, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.call_order = call_order  # where the forward pass calls it among the layers sharing its input
        self.in_features, self.out_features = base.in_features, base.out_features
        self.source = [source]  # in a list, so the shared module is not registered under every layer
        self.columns = (0, 0)  # this layer's columns of source's product
        self.register_buffer("lora_b", torch.empty(self.out_features, 0, device=device, dtype=dtype), persistent=False)

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        # Zero factors pad the rank to a multiple of 8, so that every layer's columns of the product start
        # 16 bytes apart, which the 4-bit kernel's epilogue needs to copy them whole.
        padding = -a.shape[0] % 8
        a, b = F.pad(a, (0, 0, 0, padding)), F.pad(b, (0, padding))
        self.lora_b = torch.cat((self.lora_b, b.to(self.lora_b)), dim=1)
        self.source[0].add(self, name, a, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.source[0]
        if not source.active:
            return self.base(x)
        # x is the layer's real input, before any act-order permutation inside a Q4Linear, as PEFT sees it.
        start, end = self.columns
        return self.base(x, low_rank=(source.project(x, self)[..., start:end], self.lora_b))


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
            if isinstance(module, LoraInput):
                module.set_mix(mix)
        self.mix = mix

    def _lora_layer(self, update: LowRankUpdate) -> LoraLinear:
        """The LoraLinear the update belongs to, wrapping the plain linear layer there on first use, with the
        LoraInput it shares with the other layers of its block that read the same input."""
        block = self.model.layers[update.block]
        path = update.module.split(".", 2)[2]  # e.g. "self_attn.q_proj"
        parent_path, _, attribute = path.rpartition(".")
        layer = block.get_submodule(path)
        if isinstance(layer, LoraLinear):
            return layer
        # The block's norm tells its device: a 4-bit layer handed to the CUDA kernels keeps no tensors.
        device = block.input_layernorm.weight.device
        ((siblings, producer),) = [(paths, producer) for paths, producer in SHARED_INPUTS if path in paths]
        wrapped = [block.get_submodule(p) for p in siblings if isinstance(block.get_submodule(p), LoraLinear)]
        source = wrapped[0].source[0] if wrapped else LoraInput(layer.in_features, device, self.dtype)
        if not wrapped:
            block.add_module("lora_input_" + siblings[0].replace(".", "_"), source)
            if producer is not None:
                owner_path, _, name = producer.rpartition(".")
                owner = block.get_submodule(owner_path) if owner_path else block
                plain = getattr(owner, name)
                setattr(owner, name, PRODUCERS[type(plain)](plain, source))
        layer = LoraLinear(layer, source, siblings.index(path), device, self.dtype)
        setattr(block.get_submodule(parent_path), attribute, layer)
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
