"""The Llama / Mistral forward pass: embedding, blocks (attention with GQA, SwiGLU MLP, RMSNorm, RoPE), head.

Linear layers are plain tensors or Q4Linear modules; the model does not care which. The KV cache is
owned by each attention layer and written at the positions the caller passes in.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .cuda import fused
from .config import ModelConfig
from .errors import ModelError
from .quant import LowRank, Q4Linear, add_low_rank, dense_matmul


class DenseLinear(nn.Module):
    """A bias-free linear layer with an unquantized weight [out, in]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor, low_rank: LowRank | None = None) -> torch.Tensor:
        return add_low_rank(dense_matmul(x, self.weight), low_rank)


def as_linear(weight) -> nn.Module:
    return weight if isinstance(weight, Q4Linear) else DenseLinear(weight)


# The stacks of a block by path, and the checkpoint's layers that each one runs, in output order.
STACKS = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
          "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}


class LinearStack(nn.Module):
    """Linear layers that read the same input, run as one layer whose output is theirs side by side.

    Stacking their weights turns several products into one, which on a GPU is one kernel launch instead of
    three (q, k and v) or two (gate and up). Layers whose weights cannot be stacked (a 4-bit and a dense one,
    or 4-bit ones with different group sizes or input orders) run one after another instead. A stack of one
    layer is that layer; LoRA adapters find a layer's share of the output with `rows`.
    """

    def __init__(self, named_weights: dict[str, object]):
        super().__init__()
        weights = list(named_weights.values())
        self.names = list(named_weights)
        self.out_sizes = [w.out_features if isinstance(w, Q4Linear) else w.shape[0] for w in weights]
        stacked = stack_weights(weights)
        self.parts = nn.ModuleList(as_linear(w) for w in ([stacked] if stacked is not None else weights))
        self.in_features = self.parts[0].in_features
        self.out_features = sum(self.out_sizes)

    def rows(self, name: str) -> range:
        """The rows of the stacked output that layer `name` writes."""
        index = self.names.index(name)
        start = sum(self.out_sizes[:index])
        return range(start, start + self.out_sizes[index])

    def forward(self, x: torch.Tensor, low_rank: LowRank | None = None) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x, low_rank)
        return add_low_rank(torch.cat([part(x) for part in self.parts], dim=-1), low_rank)

    def gated_kernel(self, x: torch.Tensor):
        """For a stack of SwiGLU's gate and up run by one 4-bit CUDA kernel that can compute silu(gate) * up of x in
        its epilogue (engine.cuda.q4.PreparedQ4.gates), that kernel; else None."""
        kernel = getattr(self.parts[0], "kernel", None) if len(self.parts) == 1 else None
        return kernel if kernel is not None and kernel.gates(x) else None


def take_stack(weights: dict, prefix: str, path: str) -> LinearStack:
    """The stack at `path` of a block, its layers' weights taken out of `weights` (prefix: the module's own)."""
    return LinearStack({name: weights.pop(prefix + name + ".weight") for name in STACKS[path]})


def stack_weights(weights: list):
    """One weight for all of these layers, outputs in order, or None where they cannot share one."""
    if len(weights) == 1:
        return weights[0]
    if all(isinstance(w, Q4Linear) for w in weights):
        return Q4Linear.stack(weights)
    if all(isinstance(w, torch.Tensor) and w.dtype == weights[0].dtype for w in weights):
        return torch.cat(weights)
    return None


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The norm of x; with `residual`, (x + residual, the norm of that): the residual stream's add and the
        norm after it, which on a GPU are one kernel."""
        if fused.serves(x):
            return fused.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self.normalize(x)
        x = x + residual
        return x, self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 like the reference, whatever the activation dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for each rotary pair, with the checkpoint's rope scaling applied."""
    dim = config.head_dim
    theta = config.rope_theta
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "ntk":  # NTK-aware alpha: stretch the base so low frequencies interpolate
        theta = theta * float(scaling["alpha"]) ** (dim / (dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif kind not in (None, "default", "ntk"):
        raise ModelError(f"rope scaling type {kind!r} is not supported (linear, ntk and llama3 are)")
    return inv_freq.float()


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's rule: long wavelengths are divided by `factor`, short ones kept, the band between blended."""
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    original = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(middle, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict, prefix: str):
        super().__init__()
        self.qkv_proj = take_stack(weights, prefix, "self_attn.qkv_proj")
        self.o_proj = take_stack(weights, prefix, "self_attn.o_proj")
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        # Where q, k and v sit in qkv_proj's output: the stack may be wrapped (by LoRA), so the sizes live here.
        heads = (config.num_heads, config.num_kv_heads, config.num_kv_heads)
        self.qkv_sizes = [count * config.head_dim for count in heads]
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, positions, bias) -> torch.Tensor:
        """bias: see grouped_attention; None when the tokens are the first in the cache."""
        batch, length, _ = x.shape
        if length == 1 and fused.serves(x) and self.cache.fuses(batch):
            return self.fused_decode(x, cos, sin, positions, length if bias is None else bias.shape[-1])
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.cache.attend(q, k, v, positions, bias)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def fused_decode(self, x, cos, sin, positions, cache_len: int) -> torch.Tensor:
        """One position of each row on the GPU: the cache's fused kernels rotate q and k, store k and v and
        attend, reading only the filled slots however long the graph's bucket `cache_len` is."""
        rows = x.shape[0]
        q, k, v = self.qkv_proj(x).view(rows, -1).split(self.qkv_sizes, dim=-1)  # views: the kernels take row strides
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        out = self.cache.fused_attend(q, k, v, cos, sin, positions, cache_len)
        return self.o_proj(out.view(rows, 1, -1))


class SiluMul(nn.Module):
    """SwiGLU's activation, silu(gate) * up, of gate and up side by side in one tensor [..., 2 * n]."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if fused.serves(gate_up):
            return fused.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def may_fuse(self) -> bool:
        """Whether the product that writes gate and up may compute this activation itself (FeedForward)."""
        return True


class FeedForward(nn.Module):
    def __init__(self, weights: dict, prefix: str):
        super().__init__()
        self.gate_up_proj = take_stack(weights, prefix, "mlp.gate_up_proj")
        self.act = SiluMul()
        self.down_proj = take_stack(weights, prefix, "mlp.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On a decode step the 4-bit kernel of gate and up computes the activation in its epilogue, which saves a
        # launch and the trip of gate and up through memory.
        kernel = self.gate_up_proj.gated_kernel(x) if self.act.may_fuse() else None
        activation = kernel(x, gated=True) if kernel is not None else self.act(self.gate_up_proj(x))
        return self.down_proj(activation)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict, index: int):
        super().__init__()
        prefix = f"model.layers.{index}."
        self.input_layernorm = RMSNorm(weights[prefix + "input_layernorm.weight"], config.rms_norm_eps)
        self.self_attn = Attention(config, weights, prefix + "self_attn.")
        self.post_attention_layernorm = RMSNorm(weights[prefix + "post_attention_layernorm.weight"], config.rms_norm_eps)
        self.mlp = FeedForward(weights, prefix + "mlp.")

    def forward(self, x, pending, cos, sin, positions, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the residual stream x + pending, where `pending` is the previous block's output not yet
        added (None at a segment's first block): each add of the stream runs inside the norm after it.
        Returns the stream and this block's output, pending in turn."""
        if pending is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = self.input_layernorm(x, pending)
        x, normed = self.post_attention_layernorm(x, self.self_attn(normed, cos, sin, positions, bias))
        return x, self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict):
        """Build the model from `weights` (name -> tensor or Q4Linear). The linear layers' weights leave the
        dict as their stacks take them, so that stacking never holds two copies of them."""
        super().__init__()
        self.config = config
        missing = [name for name in required_weights(config) if name not in weights]
        if missing:
            raise ModelError(f"the checkpoint lacks {len(missing)} weights the model needs, first {missing[0]!r}")
        self.embed_tokens = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)
        self.layers = nn.ModuleList(Block(config, weights, i) for i in range(config.num_layers))
        self.norm = RMSNorm(weights["model.norm.weight"], config.rms_norm_eps)
        head = weights.get("lm_head.weight")
        self.lm_head = DenseLinear(self.embed_tokens) if head is None else as_linear(head)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype, kv_cache: str = "full") -> None:
        """Preallocate every layer's KV cache, of kind `kv_cache` (cache.KV_CACHE_KINDS), on that layer's device,
        and the rotary tables on every device.

        Consecutive layers on one device form a segment; a model split over GPUs runs segment after segment,
        handing the hidden state on. The embedded tokens enter the first segment (the table itself may stay in
        CPU memory: see embedding_device); the norm and head sit with the last.
        """
        devices = [layer.input_layernorm.weight.device for layer in self.layers]
        self.segments = segments_of(devices)
        if self.embed_tokens.device != self.segments[0].device and not self.embed_tokens.is_pinned():
            # A table kept in CPU memory is pinned, so that a graph-captured step's GPU can read its row
            # (graphs.EmbeddedTokens).
            self.embed_tokens.data = self.embed_tokens.data.pin_memory()
        for layer, device in zip(self.layers, devices):
            layer.self_attn.cache = KVCache(self.config.num_kv_heads, self.config.head_dim, max_seq_len, dtype, device,
                                            kind=kv_cache)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), self.inv_freq.cpu())
        angles = torch.cat((angles, angles), dim=-1)
        # Computed once on the CPU, so every device gets the very same tables.
        self.rope = {s.device: (angles.cos().to(s.device, dtype), angles.sin().to(s.device, dtype))
                     for s in self.segments}

    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = True) -> torch.Tensor:
        """Logits (float32) for tokens [batch, length] placed at positions start.., writing the KV cache."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.step(self.embed(tokens), positions, start + tokens.shape[1], last_only, causal=start == 0)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The hidden states [*tokens.shape, hidden] of token ids, on the first segment's device."""
        table, device = self.embed_tokens, self.segments[0].device
        if table.device == device:
            return F.embedding(tokens.to(device), table)
        return self.host_rows(tokens).to(device, non_blocking=True)

    def host_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rows [*tokens.shape, hidden] of a table kept in CPU memory (embedding_device), gathered into pinned
        memory, so that they cross to the GPU at full speed and without holding up the CPU. PyTorch's pinned-memory
        allocator hands that memory out again only once the copy from it has run."""
        table = self.embed_tokens
        rows = torch.empty(*tokens.shape, table.shape[1], dtype=table.dtype, pin_memory=True)
        torch.index_select(table, 0, tokens.cpu().flatten(), out=rows.view(-1, table.shape[1]))
        return rows

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache_len: int, last_only: bool = True,
             causal: bool = False) -> torch.Tensor:
        """The forward pass of hidden states x [batch, length, hidden] (see `embed`) with positions given as a
        tensor, attending over the first cache_len cache slots. `causal` promises that the positions are
        0 .. cache_len - 1, so that attention needs no mask.

        Only tensor values change from call to call, never shapes, so a CUDA graph can capture a decode
        step for a fixed cache_len and replay it at any position below that, its input a static buffer.
        """
        for index, segment in enumerate(self.segments):
            with current_device(segment.device):
                x = self.run_segment(index, x.to(segment.device), positions.to(segment.device), cache_len, last_only,
                                     causal)
        return x

    def run_segment(self, index: int, x: torch.Tensor, positions: torch.Tensor, cache_len: int,
                    last_only: bool = True, causal: bool = False):
        """Segment `index`'s part of `step`, on its device: the hidden states x of the embedded tokens or of the
        segment before go through its layers; the last segment returns the logits."""
        segment = self.segments[index]
        rope_cos, rope_sin = self.rope[segment.device]
        cos, sin = rope_cos[positions], rope_sin[positions]
        bias = None if causal else attention_bias(positions, cache_len)
        pending = None
        for layer in self.layers[segment.layers.start:segment.layers.stop]:
            x, pending = layer(x, pending, cos, sin, positions, bias)
        if index < len(self.segments) - 1:
            return x + pending
        if last_only:
            x, pending = x[:, -1:], pending[:, -1:]
        return self.lm_head(self.norm(x, pending)[1]).float()


def attention_bias(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
    """[len(positions), cache_len]: 0 where the query at a position may see a cache slot, -inf where not."""
    keys = torch.arange(cache_len, device=positions.device)
    bias = torch.zeros(positions.shape[0], cache_len, device=positions.device)
    return bias.masked_fill(keys[None, :] > positions[:, None], float("-inf"))


@dataclass(frozen=True)
class Segment:
    device: torch.device
    layers: range


def current_device(device: torch.device):
    """Make `device` the current CUDA device for a block of code: Triton launches its kernels there, whatever
    device their tensors are on. Nothing to do on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def segments_of(devices: list[torch.device]) -> list[Segment]:
    """One segment for each run of consecutive layers on the same device."""
    segments, start = [], 0
    for device, run in itertools.groupby(devices):
        count = len(list(run))
        segments.append(Segment(device, range(start, start + count)))
        start += count
    return segments


def embedding_device(first_device: torch.device, tied: bool) -> torch.device:
    """Where the token embedding table lives, for a model whose first layers run on `first_device`.

    A decode step reads one row of the table, so with the layers on a GPU an untied table stays in CPU memory,
    as ExLlama's does: that frees the whole table's GPU memory (0.26 GB for Llama-2-7B, 1.05 GB for Llama-3-8B)
    at the cost of copying one row to the GPU per token. A tied table is also the head's weight, which every
    step reads whole, so it goes with the layers.
    """
    return torch.device("cpu") if first_device.type == "cuda" and not tied else first_device


def required_weights(config: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    parts = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names += [f"model.layers.{i}.{part}.weight" for i in range(config.num_layers) for part in parts]
    return names
