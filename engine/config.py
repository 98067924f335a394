"""Model hyper-parameters, read from an HF config.json or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict: {"rope_type" or "type": "linear" | "dynamic"/"ntk" | "llama3", ...}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, hf: dict, source: str) -> "ModelConfig":
        """Build from a parsed config.json; `source` names the file for error messages."""
        architectures = hf.get("architectures") or [hf.get("model_type", "unknown")]
        arch = architectures[0]
        if arch not in SUPPORTED_ARCHITECTURES and hf.get("model_type") not in ("llama", "mistral"):
            raise ModelError(
                f"{source}: architecture {arch!r} is not supported; this engine runs "
                f"Llama and Mistral models ({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            eos = hf.get("eos_token_id")
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                rope_scaling=hf.get("rope_scaling"),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            )
        except KeyError as missing:
            raise ModelError(f"{source}: required setting {missing} is missing") from None
        except (TypeError, ValueError) as bad:
            raise ModelError(f"{source}: a setting has the wrong type ({bad})") from None
