"""Frozen configs for the encoder and the embedding head.

``EncoderConfig.from_hf_config`` reads a Gemma-3 ``config.json``; ``to_hf_config`` writes one
back with the *configured* sliding window (512 for EmbeddingGemma). transformers rewrites that
value to ``512 // 2 + 1`` in memory; we keep the configured value everywhere and derive the
half-width of the symmetric window (``window_radius``) only when building masks, so a
conversion round trip can never halve the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embeddinggemma_jax.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_DTYPES = ("float32", "bfloat16")


def check_dtype(dtype: Any) -> str:
    """Normalise a dtype name; refuse float16 (the model's activations overflow in it)."""
    import numpy as np

    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
    if name == "float16":
        raise ValueError("float16 is not supported: EmbeddingGemma's activations overflow in float16 (NaN); "
                         "use dtype='bfloat16' or 'float32'")
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'float32' or 'bfloat16'")
    return name


@dataclass(frozen=True)
class EncoderConfig:
    """The Gemma-3 text encoder, run bidirectionally."""

    vocab_size: int = 262144
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_layers: int = 24
    num_heads: int = 3
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 512  # as configured; the symmetric radius is derived below
    layer_types: tuple[str, ...] = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(24))
    rope_theta: float = 1_000_000.0  # full-attention layers
    rope_local_base_freq: float = 10_000.0  # sliding-window layers
    max_position_embeddings: int = 2048
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1
    hidden_activation: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_heads must be a multiple of num_kv_heads")

    @property
    def window_radius(self) -> int:
        """A query at i sees key j on a sliding layer iff |i - j| <= window_radius.

        transformers turns the configured window w into ``w // 2 + 1`` and masks ``|i-j| < that``.
        """
        return self.sliding_window // 2

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def sliding_flags(self) -> tuple[bool, ...]:
        return tuple(t == SLIDING for t in self.layer_types)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "EncoderConfig":
        model_type = cfg.get("model_type")
        if model_type not in ("gemma3_text",):
            raise ConfigError(f"config.json has model_type {model_type!r}; this package implements "
                              "EmbeddingGemma ('gemma3_text' with bidirectional attention)")
        if not cfg.get("use_bidirectional_attention", False):
            raise ConfigError("config.json does not set use_bidirectional_attention; this is a causal Gemma-3 "
                              "decoder, not EmbeddingGemma")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if cfg.get(key) not in (None, 0):
                raise ConfigError(f"{key}={cfg[key]} is not supported (EmbeddingGemma uses none)")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {act!r} is not supported; expected gelu_pytorch_tanh")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling")
        if scaling not in (None, {}) and scaling.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_scaling {scaling} is not supported")
        theta = rope.get(FULL, {}).get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local = rope.get(SLIDING, {}).get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        n = cfg["num_hidden_layers"]
        pattern = cfg.get("sliding_window_pattern", 6)
        types = cfg.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]

        def _id(key, default):
            v = cfg.get(key, default)
            return v[0] if isinstance(v, list) else v

        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=n,
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg["num_key_value_heads"],
            head_dim=cfg.get("head_dim", 256),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            sliding_window=cfg["sliding_window"],
            layer_types=tuple(types),
            rope_theta=float(theta),
            rope_local_base_freq=float(local),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            pad_token_id=_id("pad_token_id", 0),
            bos_token_id=_id("bos_token_id", 2),
            eos_token_id=_id("eos_token_id", 1),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` that transformers loads into the same model (window as configured)."""
        return {
            "architectures": ["Gemma3TextModel"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "query_pre_attn_scalar": int(self.query_pre_attn_scalar) if float(self.query_pre_attn_scalar).is_integer()
            else self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_base_freq,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": self.hidden_activation,
            "use_bidirectional_attention": True,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def tiny(cls, **overrides) -> "EncoderConfig":
        """Odd, prime-ish sizes so shape bugs show up; a window of 8 so short inputs exceed it."""
        base = dict(vocab_size=263, hidden_size=48, intermediate_size=71, num_layers=4, num_heads=3,
                    num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16.0, sliding_window=8,
                    layer_types=(SLIDING, SLIDING, FULL, SLIDING), max_position_embeddings=128)
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class HeadConfig:
    """Mean pooling, Dense in->hidden, Dense hidden->out (no bias, identity), then L2 normalise."""

    in_features: int = 768
    hidden_features: int = 3072
    out_features: int = 768
    normalize: bool = True
    max_seq_length: int = 2048
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @classmethod
    def tiny(cls, encoder: EncoderConfig | None = None, **overrides) -> "HeadConfig":
        d = (encoder or EncoderConfig.tiny()).hidden_size
        base = dict(in_features=d, hidden_features=4 * d - 5, out_features=d - 8, max_seq_length=128,
                    prompts={"query": "task: search result | query: ", "document": "title: none | text: "})
        base.update(overrides)
        return cls(**base)
