"""GPTQ linear layers (AutoGPTQ / GPTQModel safetensors layout) converted exactly into Q4Linear.

Per linear layer `<prefix>` the checkpoint holds
    qweight int32 [in / 8, out]      8 consecutive input rows per word, row r in bits 4*(r % 8)
    qzeros  int32 [groups, out / 8]  8 consecutive output columns per word, column c in bits 4*(c % 8)
    scales  float [groups, out]
    g_idx   int   [in] (optional)    the group of each input row; unsorted when quantized with act-order
and the weight is W[o, r] = (q[r, o] - zero[g, o]) * scales[g, o] with g = g_idx[r]. The classic "gptq"
format stores zero - 1 in qzeros, "gptq_v2" stores the zero itself.

The tensors decide the layout: g_idx gives each row's group whatever desc_act says, and qzeros holds
the zeros whether or not the model was quantized with sym, so those two settings are not consulted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ModelError
from ..quant import PACK, Q4Linear, unpack_rows
from .safetensors_io import TensorInfo, read_tensor

FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQSettings:
    source: str  # the file the settings came from, for error messages
    group_size: int | None  # rows per group, -1 for one group, None when no settings file gave it
    checkpoint_format: str  # one of FORMATS


def parse_settings(raw: dict, source: str) -> GPTQSettings:
    """Validate GPTQ settings from quantize_config.json or config.json's `quantization_config`."""
    method = raw.get("quant_method", "gptq")
    if method != "gptq":
        raise ModelError(
            f"{source}: quantization method {method!r} is not supported; use a GPTQ, GGUF or fp16/bf16 model"
        )
    bits = raw.get("bits", 4)
    if bits != 4:
        raise ModelError(f"{source}: {bits}-bit GPTQ is not supported; use a 4-bit GPTQ model")
    # Marlin and other repacked formats keep the GPTQ tensor names but a different bit layout. Some
    # GPTQModel versions write the format under "format" instead of "checkpoint_format".
    checkpoint_format = raw.get("checkpoint_format", raw.get("format", "gptq"))
    if raw.get("is_marlin_format"):
        checkpoint_format = "marlin"
    if checkpoint_format not in FORMATS:
        raise ModelError(
            f"{source}: GPTQ checkpoint format {checkpoint_format!r} is not supported; "
            f"use a model saved in the {' or '.join(FORMATS)} format"
        )
    group_size = raw.get("group_size")
    return GPTQSettings(source, None if group_size is None else int(group_size), checkpoint_format)


def load_linear(tensors: dict[str, TensorInfo], prefix: str, settings: GPTQSettings) -> Q4Linear:
    """Read `<prefix>.qweight`, `.qzeros`, `.scales` and `.g_idx` and convert them into a Q4Linear."""
    infos = {part: tensors.get(f"{prefix}.{part}") for part in ("qweight", "qzeros", "scales", "g_idx")}
    for part in ("qzeros", "scales"):
        if infos[part] is None:
            raise ModelError(f"{infos['qweight'].path}: GPTQ tensor {prefix}.{part} is missing")

    def bad(part: str, problem: str) -> ModelError:
        return ModelError(f"{infos[part].path}: GPTQ tensor {prefix}.{part} {problem}; the checkpoint is corrupt")

    if infos["qweight"].dtype != torch.int32 or len(infos["qweight"].shape) != 2:
        raise bad("qweight", f"is {infos['qweight'].dtype} {list(infos['qweight'].shape)}, expected 2-d int32")
    rows, out_features = infos["qweight"].shape[0] * PACK, infos["qweight"].shape[1]
    groups = infos["scales"].shape[0] if infos["scales"].shape else 0  # 0-d scales fail the check below
    if infos["scales"].shape != (groups, out_features) or not infos["scales"].dtype.is_floating_point:
        raise bad("scales", f"has shape {list(infos['scales'].shape)}, expected [groups, {out_features}] floats")
    if infos["qzeros"].shape != (groups, out_features // PACK) or infos["qzeros"].dtype != torch.int32:
        expected = f"int32 [{groups}, {out_features // PACK}]"
        raise bad("qzeros", f"has shape {list(infos['qzeros'].shape)}, expected {expected}")

    if infos["g_idx"] is not None:
        g_idx = read_tensor(infos["g_idx"])
        if g_idx.shape != (rows,) or g_idx.is_floating_point():
            raise bad("g_idx", f"has shape {list(g_idx.shape)}, expected [{rows}] integers")
        if rows and (g_idx.min() < 0 or g_idx.max() >= groups):
            raise bad("g_idx", f"names groups outside 0..{groups - 1}")
    else:
        group_size = settings.group_size
        if group_size is None:
            # No settings file: the group size follows from the shapes when the groups split the rows evenly.
            if groups == 0 or rows % groups:
                raise ModelError(
                    f"{infos['qweight'].path}: cannot tell the group size of {prefix}; "
                    f"add the model's quantize_config.json to the folder"
                )
            group_size = rows // groups
        if group_size == -1:
            group_size = rows
        if group_size <= 0 or -(-rows // group_size) != groups:
            raise ModelError(
                f"{settings.source}: group size {group_size} does not match {prefix}, "
                f"which has {groups} groups over {rows} input rows"
            )
        g_idx = torch.arange(rows) // group_size

    return to_q4linear(
        read_tensor(infos["qweight"]), read_tensor(infos["qzeros"]), read_tensor(infos["scales"]),
        g_idx, zero_is_stored_minus_one=settings.checkpoint_format == "gptq",
    )


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """qzeros int32 [groups, out / 8] -> int32 [groups, out], column c from bits 4*(c % 8) of word c // 8."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).flatten(1)


def to_q4linear(qweight, qzeros, scales, g_idx, zero_is_stored_minus_one: bool) -> Q4Linear:
    """Exact conversion of consistent GPTQ tensors (see the module docstring) into Q4Linear."""
    q = unpack_rows(qweight)
    zeros = unpack_columns(qzeros) + int(zero_is_stored_minus_one)
    # float32 holds scale * zero exactly (11 + 5 significant bits), so W = scale * q + offset is exact too.
    scale = scales.float()
    offset = -scale * zeros.float()

    g_idx = g_idx.to(torch.int64)
    perm = None
    if bool((g_idx[1:] < g_idx[:-1]).any()):
        # Act-order: gather the rows of each group together; the layer then computes x[..., perm].
        perm = torch.argsort(g_idx, stable=True)
        q = q[perm]
        g_idx = g_idx[perm]

    # Q4Linear wants equal groups, but GPTQ's last group is short when group_size does not divide `in`
    # (576 rows in groups of 128), and a group may even be empty. Splitting every group into runs of the
    # greatest common size and repeating its scale and offset per run is exact.
    counts = torch.bincount(g_idx, minlength=scale.shape[0])
    run = math.gcd(*counts.tolist())
    repeats = counts // run
    return Q4Linear.from_values(
        q, scale.repeat_interleave(repeats, dim=0), offset.repeat_interleave(repeats, dim=0), run, perm
    )
