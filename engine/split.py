"""Placing a model's layers on several GPUs, planned from the checkpoint's metadata before any weight is read.

Layers go in order: the first GPU takes the first layers, each next GPU the layers that follow, and the last
one also the final norm and the head. A layer's KV cache lives with the layer. The embedding table takes
GPU memory only when tied to the head, on the first GPU; an untied one stays in CPU memory
(engine.model.embedding_device).
`--gpu-split 17.2,24` gives each GPU, in order, a share in GiB (at most its free memory); `--gpu-split auto`
uses each GPU's free memory. Either way the plan fills the GPUs in order and, unlike ExLlama's -gs (weights
only, so long contexts run out of memory), a share covers everything the model will allocate there:

    weights   every tensor in the form it takes on the GPU (`device_bytes`); a 4-bit layer in the CUDA
              kernels' padded layout, the rest dense in the activation dtype (b bytes)
    cache     2 (keys, values) x kv_heads x head_dim x C x b per layer, C = the max sequence length; a
              quantized cache (--kv-cache) takes bits / 8 + 4 / 32 bytes an entry instead of b
    buffers   the larger of two workspaces, which never coexist:
                prefill  one chunk of T tokens (the generator's 2048 on a GPU, or C if shorter) attending over
                         C slots:
                         6 x T x C                                         the mask, float32 and an fp16 copy (the
                                                                           fused attention kernels keep no scores)
                         + 3 x T x intermediate x b + 8 x T x hidden x b   MLP and residual activations
                         + 2 x 4096 x max(hidden, intermediate), at most   the fp16 copy of the outputs that
                           2 x out x in of the largest 4-bit stack         the cuBLAS path dequantizes at a time
                         + 10 x T x vocab on the last GPU                  fp16 logits, fp32 logits, log-softmax
                         + 2 x kv_heads x head_dim x C x b, quantized      a layer's cache read back for the
                                                                           prompt's attention
                load     9 x 4096 x max(hidden, intermediate)              repacking the largest 4-bit stack for
                         + 1 byte a weight of that stack                   the kernels, 4096 outputs at a time
              A stack is the layers that run as one (q, k and v; gate and up: engine.model.STACKS).
              + 2 x 6 x C + 64 MiB                                        the CUDA graphs' pool (all buckets): a
                                                                          token's mask in each of two graph sets
              + 2 x C x head_dim x b                                      the rotary tables
              + 4% of weights, cache and buffers + 512 MiB                the margin: allocator rounding, and
                                  what the CUDA context takes on first use (kernel images, cuBLAS workspaces)

GiB here is 2**30 bytes, as in ExLlama's -gs. The prefill term assumes the generator's chunks; a perplexity
window longer than a chunk needs more. LoRA adapters and parallel samples are not planned for.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .cache import KV_CACHE_KINDS, cache_bytes_per_entry
from .config import ModelConfig
from .cuda.q4 import DEQUANTIZE_OUTPUTS, REPACK_OUTPUTS, SLICE_N, STEP_K
from .errors import ModelError
from .formats import gguf, hf
from .generator import PREFILL_CHUNK
from .model import STACKS, required_weights

GiB = 1 << 30
MARGIN = 0.04
RESERVE = 512 << 20
GRAPH_POOL_SLACK = 64 << 20
REPACK_BYTES_PER_WEIGHT = 9  # cuda.q4.repack peaks at two int32 temporaries of the unpacked outputs it works on
MIN_GROUP = 16  # the smallest group size the kernels take: an upper bound on scale bytes when unknown

EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
NORM = "model.norm.weight"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class WeightShape:
    """What one checkpoint tensor becomes on the GPU: dense, or a 4-bit linear layer of shape [out, in]."""

    shape: tuple[int, ...]
    group_size: int = 0  # inputs per scale and offset of a 4-bit layer; 0 for a dense tensor
    act_order: bool = False  # a 4-bit layer that permutes its inputs


def device_bytes(weight: WeightShape, dtype_bytes: int) -> int:
    """Bytes the tensor occupies on the GPU once loaded (engine.cuda.q4 describes the 4-bit layout)."""
    if not weight.group_size:
        return math.prod(weight.shape) * dtype_bytes
    out_features, in_features = weight.shape
    k_pad, n_pad = -(-in_features // STEP_K) * STEP_K, -(-out_features // SLICE_N) * SLICE_N
    groups = -(-k_pad // weight.group_size)
    perm = 12 * in_features if weight.act_order else 0  # int64 kept by Q4Linear, int32 for the kernel
    return n_pad * k_pad // 2 + n_pad * groups * 4 + perm


def layer_index(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def largest_q4_stack(shapes: dict[str, WeightShape], num_layers: int) -> int:
    """Weights in the largest stack of 4-bit layers, which the model runs (and dequantizes) as one."""
    largest = 0
    for index in range(num_layers):
        for path, names in STACKS.items():
            parent = path.rpartition(".")[0]
            members = [shapes.get(f"model.layers.{index}.{parent}.{name}.weight") for name in names]
            largest = max(largest, sum(math.prod(w.shape) for w in members if w is not None and w.group_size))
    return largest


@dataclass(frozen=True)
class Footprint:
    """Bytes the model allocates on a GPU, by part, for a context of `max_seq_len` tokens."""

    layers: tuple[int, ...]  # weights of each layer
    layer_cache: int  # KV cache of one layer
    embedding: int  # the table on the first GPU: 0 when untied, since it stays in CPU memory
    norm: int
    head: int  # the head's weights; a copy of the embedding when tied, needed only on a GPU without it
    tied: bool
    buffers: int  # workspace, graph pool and rotary tables of a GPU without the head
    last_buffers: int  # the same for the GPU with the head, which also holds the logits
    max_seq_len: int

    @classmethod
    def of(cls, config: ModelConfig, shapes: dict[str, WeightShape], max_seq_len: int,
           dtype_bytes: int = 2, prefill_tokens: int = PREFILL_CHUNK["cuda"], kv_cache: str = "full") -> Footprint:
        layers = [0] * config.num_layers
        for name, weight in shapes.items():
            index = layer_index(name)
            if index is not None:
                layers[index] += device_bytes(weight, dtype_bytes)
        largest_q4 = largest_q4_stack(shapes, config.num_layers)
        tied = HEAD not in shapes
        t, b = min(prefill_tokens, max_seq_len), dtype_bytes
        layer_slots = config.num_kv_heads * config.head_dim * max_seq_len
        entry_bytes = sum(cache_bytes_per_entry(bits, b) for bits in KV_CACHE_KINDS[kv_cache])  # a key and a value
        widest_in = max(config.hidden_size, config.intermediate_size)
        prefill = (6 * t * max_seq_len + 3 * t * config.intermediate_size * b
                   + 8 * t * config.hidden_size * b + 2 * min(largest_q4, DEQUANTIZE_OUTPUTS * widest_in))
        if kv_cache != "full":
            prefill += 2 * layer_slots * b
        load = REPACK_BYTES_PER_WEIGHT * min(largest_q4, REPACK_OUTPUTS * widest_in) + largest_q4
        fixed = (2 * 6 * max_seq_len + GRAPH_POOL_SLACK
                 + 2 * max_seq_len * config.head_dim * b)
        logits = 10 * t * config.vocab_size
        return cls(
            layers=tuple(layers),
            layer_cache=math.ceil(layer_slots * entry_bytes),
            embedding=device_bytes(shapes[EMBEDDING], b) if tied else 0,
            norm=device_bytes(shapes[NORM], b),
            head=device_bytes(shapes[EMBEDDING if tied else HEAD], b),
            tied=tied,
            buffers=max(prefill, load) + fixed,
            last_buffers=max(prefill + logits, load) + fixed,
            max_seq_len=max_seq_len,
        )

    def share(self, device: int, layers: range, first: bool, last: bool) -> GpuShare:
        """What GPU `device` needs to hold `layers`, and the embedding if `first`, and the head if `last`."""
        weights = sum(self.layers[layers.start:layers.stop])
        if first:
            weights += self.embedding
        if last:
            weights += self.norm if self.tied and first else self.norm + self.head
        cache = len(layers) * self.layer_cache
        buffers = self.last_buffers if last else self.buffers
        buffers += math.ceil((weights + cache + buffers) * MARGIN) + RESERVE
        return GpuShare(device, layers, weights, cache, buffers)


@dataclass(frozen=True)
class GpuShare:
    device: int  # CUDA device index
    layers: range
    weights: int
    cache: int
    buffers: int  # with the margin

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.buffers


@dataclass(frozen=True)
class Placement:
    shares: tuple[GpuShare, ...]

    @property
    def first_device(self) -> torch.device:
        return torch.device("cuda", self.shares[0].device)

    @property
    def last_device(self) -> torch.device:
        return torch.device("cuda", self.shares[-1].device)

    def device_of(self, name: str) -> torch.device:
        """The GPU that holds the weight `name` (an HF Llama name)."""
        index = layer_index(name)
        if index is None:
            share = self.shares[0] if name == EMBEDDING else self.shares[-1]
        else:
            share = next(s for s in self.shares if index in s.layers)
        return torch.device("cuda", share.device)

    def describe(self) -> str:
        return "; ".join(
            f"cuda:{s.device} layers {s.layers.start}-{s.layers.stop - 1}: {_gib(s.total)} GiB "
            f"({_gib(s.weights)} weights + {_gib(s.cache)} cache + {_gib(s.buffers)} buffers)" for s in self.shares)


def plan_split(footprint: Footprint, budgets: Sequence[int]) -> Placement:
    """Fill the GPUs in order, each with as many of the remaining layers as its budget (bytes) holds.

    Every GPU used holds at least one layer: the embedding goes with the first layer and the head with the
    last, so when the head does not fit beside the last layer, that layer moves on to the next GPU.
    """
    count = len(footprint.layers)
    shares, start = [], 0
    for device, budget in enumerate(budgets):
        if start == count:
            break
        first = start == 0
        stop = start
        while stop < count and footprint.share(device, range(start, stop + 1), first, False).total <= budget:
            stop += 1
        if stop == count and footprint.share(device, range(start, count), first, True).total > budget:
            stop -= 1
        if stop > start:
            shares.append(footprint.share(device, range(start, stop), first, stop == count))
            start = stop
    if start < count:
        raise ModelError(_does_not_fit(footprint, budgets, start))
    return Placement(tuple(shares))


def _does_not_fit(footprint: Footprint, budgets: Sequence[int], placed: int) -> str:
    count = len(footprint.layers)
    # What the whole model needs spread over all these GPUs: every GPU pays its own buffers.
    weights = sum(footprint.layers) + footprint.embedding + footprint.norm
    weights += 0 if footprint.tied and len(budgets) == 1 else footprint.head
    cache = count * footprint.layer_cache
    buffers = (len(budgets) - 1) * footprint.buffers + footprint.last_buffers
    buffers += math.ceil((weights + cache + buffers) * MARGIN) + len(budgets) * RESERVE
    if len(set(budgets)) == 1:
        offered = f"{len(budgets)} x {_gib(budgets[0])}" if len(budgets) > 1 else _gib(budgets[0])
    else:
        offered = " + ".join(_gib(b) for b in budgets)
    return (f"the model does not fit: it needs {_gib(weights + cache + buffers)} GiB ({_gib(weights)} weights + "
            f"{_gib(cache)} KV cache for {footprint.max_seq_len} tokens + {_gib(buffers)} buffers) and the GPUs "
            f"offer {offered} GiB, room for {placed} of its {count} layers; "
            f"lower --max-seq-len or give it more GPU memory")


def _gib(size: int) -> str:
    return f"{size / GiB:.1f}"


def parse_gpu_split(spec: str) -> list[float] | None:
    """`auto` -> None; `17.2,24` -> GiB per GPU in order."""
    if spec.strip().lower() == "auto":
        return None
    try:
        shares = [float(part) for part in spec.split(",")]
    except ValueError:
        shares = []
    if not shares or any(not math.isfinite(s) or s < 0 for s in shares):
        raise ModelError(f"--gpu-split {spec!r} is not GiB per GPU like 17.2,24, nor auto")
    return shares


def free_gpu_memory(count: int | None = None) -> list[int]:
    """Free bytes on the first `count` visible CUDA GPUs (all when None), in device order; empty without CUDA.

    Asking creates a GPU's CUDA context, so GPUs beyond `count` are left alone.
    """
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [torch.cuda.mem_get_info(index)[0] for index in range(visible if count is None else min(count, visible))]


def gpu_budgets(spec: str, free_memory: Callable[[int | None], list[int]] = free_gpu_memory) -> list[int]:
    """Bytes each GPU may use for `--gpu-split spec`: its share, capped at its free memory, or for auto all its
    free memory. Checked before anything is read, since it costs nothing."""
    shares = parse_gpu_split(spec)
    free = free_memory(None if shares is None else len(shares))
    if not free:
        raise ModelError("--gpu-split needs CUDA GPUs, and none is visible")
    if shares is None:
        return free
    if len(shares) > len(free):
        raise ModelError(f"--gpu-split gives {len(shares)} shares but only {len(free)} GPUs are visible")
    return [min(int(share * GiB), available) for share, available in zip(shares, free)]


def checkpoint_shapes(path: str, quantize: int | None) -> tuple[ModelConfig, dict[str, WeightShape]]:
    """The config and every weight's form on the GPU, read from the checkpoint's metadata, not its tensors."""
    config, shapes = _hf_shapes(path) if os.path.isdir(path) else _gguf_shapes(path)
    missing = [name for name in required_weights(config) if name not in shapes]
    if missing:
        raise ModelError(f"{path}: the checkpoint lacks {len(missing)} weights the model needs, first {missing[0]!r}")
    if quantize:
        # As loader._place does: --quantize 4 turns every dense linear layer but the head into 4 bits.
        shapes = {name: _quantized(w) if name.endswith("_proj.weight") and not w.group_size else w
                  for name, w in shapes.items()}
    return config, shapes


def _quantized(weight: WeightShape) -> WeightShape:
    in_features = weight.shape[1]
    return WeightShape(weight.shape, 128 if in_features % 128 == 0 else in_features)  # as Q4Linear.quantize


def _hf_shapes(folder: str) -> tuple[ModelConfig, dict[str, WeightShape]]:
    """From config.json and the safetensors headers; a GPTQ layer is one whose qweight is present."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ModelError(f"{folder}: config.json is missing; point at a Hugging Face model folder")
    config = ModelConfig.from_hf(hf._read_json(config_path), config_path)
    tensors, _ = hf._tensor_index(folder)
    shapes = {}
    for name, shape in hf._expected_shapes(config).items():
        prefix = name.removesuffix(".weight")
        scales = tensors.get(prefix + ".scales")
        if prefix + ".qweight" in tensors and scales is not None and scales.shape:
            rows, groups = shape[1], scales.shape[0]
            # gptq.to_q4linear splits uneven groups into runs of a common size; assume the smallest.
            group = rows // groups if groups and rows % groups == 0 else MIN_GROUP
            shapes[name] = WeightShape(shape, group, act_order=prefix + ".g_idx" in tensors)
        else:
            shapes[name] = WeightShape(shape)
    return config, shapes


def _gguf_shapes(path: str) -> tuple[ModelConfig, dict[str, WeightShape]]:
    """From the GGUF header's tensor list: 4-bit linear layers stay 4-bit (group 32), the rest become dense."""
    reader = gguf.open_gguf(path)
    config = gguf.read_config(reader, path)
    shapes = {}
    for tensor in reader.tensors:
        name = gguf._hf_name(tensor.name)
        if name is None:
            continue
        part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        four_bit = part in gguf.LINEAR_PARTS and tensor.tensor_type.name in gguf.FOUR_BIT
        shapes[name] = WeightShape(tuple(int(s) for s in reversed(tensor.shape)), gguf.QK if four_bit else 0)
    return config, shapes
