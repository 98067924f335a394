"""PEFT LoRA adapters, applied unmerged so that every request can choose its own mix without reloading.

An adapted layer adds ((x @ A^T) * c) @ B^T to its output for each adapter, where c is the adapter's scale
times the request's weight for it (0 for adapters left out). The model runs the layers that read one input
as one stack (q, k and v; gate and up; o; down: engine.model.LinearStack), and a LoraStack adds the updates
of all of a stack's layers at once:

    LoraStack.lora_a [sum of ranks, in]   every (layer, adapter) A factor, one after another
    LoraStack.mixed                       the same, each premultiplied by its c
    LoraStack.lora_b [out, sum of ranks]  each B factor in its layer's rows of the stacked output and its A's
                                          columns, zero elsewhere

so a forward pass costs one product x @ mixed^T per stack, and the 4-bit CUDA kernel multiplies it by
lora_b in its epilogue without a launch of its own. On a one-row CUDA step the first product runs in the
kernel that writes the input, where that is a norm (LoraNorm) or the MLP's activation (LoraSiluMul).

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
from .model import STACKS, LinearStack, RMSNorm, SiluMul

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


# The module whose output each stack of a block reads, where a fused kernel of that module can compute the
# updates' first product too.
STACK_INPUTS = {"self_attn.qkv_proj": "input_layernorm", "self_attn.o_proj": None,
          "mlp.gate_up_proj": "post_attention_layernorm", "mlp.down_proj": "mlp.act"}


class LoraStack(nn.Module):
    """A stack of linear layers plus the low-rank updates of every loaded adapter that targets one of them."""

    def __init__(self, base: LinearStack, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_a", torch.empty(0, self.in_features, device=device, dtype=dtype), persistent=False)
        self.register_buffer("mixed", torch.empty_like(self.lora_a), persistent=False)
        self.register_buffer("lora_b", torch.empty(self.out_features, 0, device=device, dtype=dtype), persistent=False)
        self.spans: list[tuple[str, int, int, float]] = []  # rows of lora_a: (adapter name, first, end, scale)
        # Whether the request applies any adapter at all: otherwise the update is skipped. It is the same for
        # every stack, so that a CUDA graph captured with adapters applied records every stack's update, and
        # serves any later mix by the in-place rewrite of `mixed`.
        self.active = False
        self._input: torch.Tensor | None = None  # the input of the product held in _product
        self._product: torch.Tensor | None = None

    def add(self, layer: str, name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Add adapter `name`'s factors for the stack's layer `layer`."""
        # Zero factors pad the rank to a multiple of 8, so that the product's rows are whole 16-byte units,
        # which the 4-bit kernel's epilogue needs to copy them.
        padding = -a.shape[0] % 8
        a = F.pad(a, (0, 0, 0, padding))
        stacked_b = b.new_zeros(self.out_features, a.shape[0])
        rows = self.base.rows(layer)
        stacked_b[rows.start:rows.stop, :b.shape[1]] = b
        start = self.lora_a.shape[0]
        self.lora_a = torch.cat((self.lora_a, a.to(self.lora_a)))
        self.lora_b = torch.cat((self.lora_b, stacked_b.to(self.lora_b)), dim=1)
        self.mixed = torch.zeros_like(self.lora_a)  # every coefficient is 0 until the next set_mix
        self.spans.append((name, start, start + a.shape[0], scale))
        self.active = False

    def set_mix(self, mix: dict[str, float]) -> None:
        coefficients = torch.zeros(self.lora_a.shape[0], dtype=torch.float32)
        for name, start, end, scale in self.spans:
            coefficients[start:end] = scale * mix.get(name, 0.0)
        # In place: a captured graph keeps reading this very tensor.
        self.mixed.copy_(self.lora_a.float() * coefficients.to(self.lora_a.device)[:, None])
        self.active = bool(mix)

    def hold(self, x: torch.Tensor, product: torch.Tensor) -> None:
        """Take x @ mixed^T, computed with x by the module that wrote x, for the next forward pass on x."""
        self._input, self._product = x, product

    def gated_kernel(self, x: torch.Tensor):
        """The base stack's (LinearStack.gated_kernel) while no adapter applies: an update must join gate and up
        before the activation."""
        return None if self.active else self.base.gated_kernel(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.base(x)
        # x is the stack's real input, before any act-order permutation inside a Q4Linear, as PEFT sees it.
        product = self._product if x is self._input else None
        self._input = self._product = None  # a long prompt's product is not kept
        if product is None:
            product = fused.low_rank_project(x, self.mixed) if one_row_on_gpu(x) else F.linear(x, self.mixed)
        return self.base(x, low_rank=(product, self.lora_b))


def one_row_on_gpu(x: torch.Tensor) -> bool:
    """Whether x is a decode step's single row on the GPU, which the fused one-row kernels serve."""
    return x.numel() == x.shape[-1] and fused.serves(x)


class LoraNorm(RMSNorm):
    """The norm whose output a LoraStack reads. On a one-row CUDA step one kernel normalizes and computes the
    stack's first product, which then needs no launch of its own."""

    def __init__(self, norm: RMSNorm, reader: LoraStack):
        super().__init__(norm.weight, norm.eps)
        self.reader = [reader]  # in a list, so the stack is not registered here too

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        reader = self.reader[0]
        if not (reader.active and one_row_on_gpu(x)):
            return super().forward(x, residual)
        total, y, product = fused.rms_norm_project(x, self.weight, self.eps, reader.mixed, residual)
        reader.hold(y, product)
        return y if residual is None else (total, y)


class LoraSiluMul(SiluMul):
    """The MLP's activation, whose output the down stack reads. On a one-row CUDA step one kernel writes it and
    the partial sums of the stack's first product, which then needs no launch of its own."""

    def __init__(self, act: SiluMul, reader: LoraStack):  # act, the plain activation replaced, holds no state
        super().__init__()
        self.reader = [reader]  # in a list, so the stack is not registered here too

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        reader = self.reader[0]
        if not (reader.active and one_row_on_gpu(gate_up)):
            return super().forward(gate_up)
        out, parts = fused.silu_mul_project(gate_up, reader.mixed)
        reader.hold(out, parts)
        return out

    def may_fuse(self) -> bool:
        # While an update of the down stack applies, this module's kernel also writes that update's first product.
        return not self.reader[0].active


# The module that computes a LoraStack's first product along with its input, by the type of the one it replaces.
PRODUCERS = {RMSNorm: LoraNorm, SiluMul: LoraSiluMul}


def stack_of(block: nn.Module, path: str) -> tuple[str, str]:
    """The path of the stack of `block` that runs layer `path` (e.g. "self_attn.q_proj"), and the layer's name."""
    parent, _, layer = path.rpartition(".")
    for stack_path, layers in STACKS.items():
        if stack_path.startswith(parent + ".") and layer in layers:
            return stack_path, layer
    raise ModelError(f"the model has no layer {path!r} to adapt")


def plain_stack(module: nn.Module) -> LinearStack:
    """The stack itself, whether adapted or not."""
    return module.base if isinstance(module, LoraStack) else module


def layer_shape(model: nn.Module, path: str) -> tuple[int, int]:
    """(inputs, outputs) of layer `path` of the model, e.g. "layers.3.self_attn.q_proj"."""
    _, index, rest = path.split(".", 2)
    block = model.layers[int(index)]
    stack_path, layer = stack_of(block, rest)
    stack = plain_stack(block.get_submodule(stack_path))
    return stack.in_features, len(stack.rows(layer))


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
            block = self.model.layers[update.block]
            stack_path, layer = stack_of(block, update.module.split(".", 2)[2])
            self._lora_stack(block, stack_path).add(layer, name, update.a, update.b, update.scale)
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
            if isinstance(module, LoraStack):
                module.set_mix(mix)
        self.mix = mix

    def _lora_stack(self, block: nn.Module, stack_path: str) -> LoraStack:
        """The LoraStack at `stack_path` of `block`, wrapping the plain stack there on first use, and making the
        module whose output it reads compute its first product too."""
        stack = block.get_submodule(stack_path)
        if isinstance(stack, LoraStack):
            return stack
        # The block's norm tells its device: a 4-bit layer handed to the CUDA kernels keeps no tensors.
        wrapped = LoraStack(stack, block.input_layernorm.weight.device, self.dtype)
        parent_path, _, attribute = stack_path.rpartition(".")
        setattr(block.get_submodule(parent_path), attribute, wrapped)
        producer = STACK_INPUTS[stack_path]
        if producer is not None:
            owner_path, _, name = producer.rpartition(".")
            owner = block.get_submodule(owner_path) if owner_path else block
            setattr(owner, name, PRODUCERS[type(getattr(owner, name))](getattr(owner, name), wrapped))
        return wrapped


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
    return [_update(path, layer, pair, settings, layer_shape(model, path), weights_path)
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


def _update(path: str, block: int, pair: dict[str, torch.Tensor], settings: dict, shape: tuple[int, int],
            weights_path: str) -> LowRankUpdate:
    """One layer's factors with PEFT's scale, checked to fit the layer and the configured rank."""
    for factor, other in (("A", "B"), ("B", "A")):
        if factor not in pair:
            raise ModelError(f"{weights_path}: {path} has lora_{other} but no lora_{factor}")
    peft_key = "model." + path  # the module name PEFT matches rank_pattern and alpha_pattern against
    # Missing r and lora_alpha mean PEFT's defaults, 8 and 8.
    rank = int(_pattern_value(settings.get("rank_pattern") or {}, peft_key, settings.get("r", 8)))
    alpha = float(_pattern_value(settings.get("alpha_pattern") or {}, peft_key, settings.get("lora_alpha", 8)))
    in_features, out_features = shape
    expected = {"A": (rank, in_features), "B": (out_features, rank)}
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
